"""Sampling commands: ``sample {variant} {patient}``, ``train-classifier`` and ``simulate``.

``sample`` is the workflow's per-patient job (results/samples/{v}/{p}/); ``simulate`` runs one new
patient from image files and clinical values on the command line, preprocessing included, and prints
a summary table. ``train-classifier`` fits the built-in HE classifier used by ``flag_source: classifier``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hemexp.core.commands import add_config_arg, config_from, patient_stage
from hemexp.core.layout import Layout

if TYPE_CHECKING:
    from hemexp.sampling.simulate import DicomRequest


def _sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-samples", type=int, default=None, help="samples per patient (default: sampling.n_samples)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: sampling.guidance_scale)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: sampling.ddim_steps)")
    p.add_argument("--solver", default=None, choices=["ddim", "dpmpp_2m", "unipc"],
                   help="sampling solver (default: sampling.solver)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: sampling.seed)")
    p.add_argument("--chunk-size", type=int, default=None, help="U-Net rows per call (default: sampling.chunk_size)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_config_arg(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="N follow-ups of one test patient -> results/samples/{v}/{p}/")
    p.add_argument("variant", help="a name from diffusion.variants")
    p.add_argument("patient", help="patient ID (manifest patient_id)")
    p.add_argument("--flag-source", default=None,
                   help="oracle | classifier | external | 0 | 1 | a probability (default: sampling.flag_source)")
    p.add_argument("--out", default=None, help="output folder (default: results/samples/{v}/{p})")
    _sampler_args(p)
    p.set_defaults(func=_sample)

    p = sub.add_parser("train-classifier", help="fit the built-in HE classifier on the training split "
                                                "-> results/models/classifier/")
    p.add_argument("--patients", nargs="+", default=None, help="patients whose preprocess summaries to use "
                                                               "(default: the whole cohort)")
    add_config_arg(p)
    p.set_defaults(func=_train_classifier)

    p = sub.add_parser("eval-classifier", help="held-out AUC/sensitivity/specificity of the built-in HE classifier "
                                               "-> results/metrics/classifier.json")
    p.add_argument("--patients", nargs="+", default=None, help="patients to score (default: the whole cohort)")
    add_config_arg(p)
    p.set_defaults(func=_eval_classifier)

    p = sub.add_parser("fit-ood", help="fit the out-of-distribution gate's training envelope "
                                       "-> results/models/ood/envelope.json")
    p.add_argument("--patients", nargs="+", required=True, help="training patients (preprocessed and ingested)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    add_config_arg(p)
    p.set_defaults(func=_fit_ood)

    p = sub.add_parser("simulate", help="simulate follow-ups of one patient from files and clinical values")
    p.add_argument("--ct", required=True, help="baseline CT: NIfTI file or DICOM folder")
    p.add_argument("--iph", required=True, help="baseline IPH mask (NIfTI); a label map if the same as --ivh")
    p.add_argument("--ivh", default=None, help="baseline IVH mask (NIfTI); omit when there is no IVH")
    p.add_argument("--clinical", nargs="+", default=None, metavar="KEY=VALUE",
                   help="clinical values, e.g. onset_to_ct_h=2.5 age=71 gcs=13 sbp=182 anticoagulant=0 antiplatelet=1 "
                        "(baseline_iph_ml defaults to the measured mask volume)")
    p.add_argument("--clinical-json", default=None, help="JSON object of clinical values (--clinical wins)")
    p.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE", dest="overrides",
                   help="scenario: +x/-x relative, 'toggle', else absolute; clamped to the model's ranges")
    p.add_argument("--models", default=None, help="trained model folder (default: <results_dir>/models) or a "
                                                  "registered model, models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--variant", default=None, help="diffusion variant (default: evaluation.perturbation_variant)")
    p.add_argument("--flag", default="classifier",
                   help="expansion flag: 0, 1, a probability p (samples split p : 1-p) or 'classifier'")
    p.add_argument("--template", default=None, help="CT template (default: preprocess.template or <models>/../template)")
    p.add_argument("--template-mask", default=None)
    p.add_argument("--patient-id", default="simulated", help="ID used in the products (letters, digits, - and _)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _sampler_args(p)
    p.set_defaults(func=_simulate)


def _settings(cfg: dict[str, Any], args: argparse.Namespace) -> Any:
    from hemexp.sampling.sampler import SamplerSettings

    return SamplerSettings.from_config(cfg["sampling"], steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                       chunk_size=args.chunk_size, solver=args.solver)


@patient_stage("sample")
def _sample(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    import nibabel as nib
    import numpy as np

    from hemexp.core.config import unknown_variant
    from hemexp.preprocess.pipeline import read_summary
    from hemexp.sampling.flags import flag_plan_for
    from hemexp.sampling.sampler import load_bundle
    from hemexp.sampling.simulate import PatientInput, simulate_patient

    if problem := unknown_variant(cfg, args.variant, "sample"):
        raise SystemExit(problem)
    pdir = Layout.of(cfg).preprocessed(args.patient)
    pre = read_summary(args.patient, pdir)
    clf = Layout.of(cfg).classifier
    source = args.flag_source if args.flag_source is not None else cfg["sampling"]["flag_source"]
    if str(source) == "classifier" and not clf.is_file():  # a workflow problem, not this patient's
        raise SystemExit(f"hemexp sample: flag source 'classifier' needs {clf} (run hemexp train-classifier)")
    plan = flag_plan_for(cfg, args.patient, pre, source, args.n_samples or cfg["sampling"]["n_samples"])
    followup = {k: np.asarray(nib.load(str(pdir / f"fu_{k}.nii.gz")).dataobj) for k in ("ct", "iph", "ivh")
                if (pdir / f"fu_{k}.nii.gz").is_file()}
    diffusion = Layout.of(cfg).diffusion_model(args.variant)
    bundle = load_bundle(Layout.of(cfg).vae_model, diffusion, Layout.of(cfg).latent_stats, args.device)
    out = Path(args.out) if args.out else Layout.of(cfg).samples(args.variant, args.patient)
    patient = PatientInput(args.patient, pdir, pre["clinical"], followup if len(followup) == 3 else None)
    summary = simulate_patient(bundle, patient, plan, _settings(cfg, args), cfg["sampling"],
                               cfg["preprocess"]["hu_window"], out, args.variant,
                               extra={"split": pre.get("split"), "site": pre.get("site"),
                                      "flag_used_by_model": bool(bundle.diffusion.uses_flag)},
                               ood=_ood_request(cfg, args.patient, pre),
                               dicom=_dicom_request(cfg, args.patient, args.variant, plan.source))
    fu = summary["followup_ml"]
    print(f"{args.patient} {args.variant}: {plan.n_samples} samples ({plan.source}, p={plan.p:.2f}); IPH median "
          f"{fu['iph']['median']:.1f} mL, P(expansion) {summary['p_expansion']:.2f}, "
          f"{summary['timings_s']['total_s']:.1f} s -> {out}")


def _ood_request(cfg: dict[str, Any], patient_id: str, pre: dict[str, Any]) -> Any:
    """The OOD gate's request for one workflow patient (scored by ``simulate_patient`` against
    ``models/ood/envelope.json``; a results folder without one gets its values recorded, not judged)."""
    from hemexp.sampling.ood import OodRequest, pipeline_input_features

    path = Layout.of(cfg).ood_envelope
    return OodRequest(pipeline_input_features(cfg, patient_id, pre), pre["clinical"], None,
                      path if path.is_file() else None)


def _dicom_request(cfg: dict[str, Any], patient_id: str, variant: str, flag_source: str) -> DicomRequest | None:
    """``sampling.dicom_output`` resolved for one patient (``auto``: on when ingest read a DICOM baseline
    CT, as recorded in ``ingest.json``); None when off."""
    from hemexp.core.config import config_hash
    from hemexp.core.files import read_json
    from hemexp.io.dicom_seg import dicom_output_enabled, hemexp_version
    from hemexp.sampling.simulate import DicomRequest

    layout = Layout.of(cfg)
    facts = layout.ingest_facts(patient_id)
    fmt = read_json(facts)["native"]["bl"]["source"].get("format") if facts.is_file() else None
    if not dicom_output_enabled(cfg["sampling"].get("dicom_output", "auto"), fmt):
        return None
    return DicomRequest(layout.native_baseline_ct(patient_id),
                        {"model": {"hemexp_version": hemexp_version(), "variant": variant, "flag_source": str(flag_source)},
                         "config_hash": config_hash(cfg), "baseline_input_format": fmt})


def _classifier_table(cfg: dict[str, Any], ids: list[str] | None) -> Any:
    from hemexp.cohort.manifest import read_manifest
    from hemexp.cohort.patients import patients
    from hemexp.core.layout import manifest_path
    from hemexp.sampling.classifier import patient_table_from_summaries

    ids = ids or [p.patient_id for p in patients(cfg)]
    return patient_table_from_summaries([Layout.of(cfg).preprocessed(pid) / "summary.json" for pid in sorted(ids)],
                                        read_manifest(manifest_path(cfg), check_files=False))


def _classifier_path(cfg: dict[str, Any]) -> Path:
    return Layout.of(cfg).classifier


def _train_classifier(args: argparse.Namespace) -> int:
    from hemexp.core.files import write_json
    from hemexp.sampling.classifier import train_classifier

    cfg = config_from(args)
    table = _classifier_table(cfg, args.patients)
    ccfg = cfg["evaluation"]["classifier"]
    clf = train_classifier(table, C=ccfg["C"], cv_folds=ccfg["cv_folds"], target_sensitivity=ccfg["target_sensitivity"],
                           seed=cfg["seed"])
    path = _classifier_path(cfg)
    clf.save(path)
    write_json(path.with_name("metrics.json"), clf.report)
    print(f"HE classifier: train CV AUC {clf.report['train_cv']['auc']:.3f} "
          f"(threshold {clf.threshold:.3f}) -> {path}")
    return 0


def _eval_classifier(args: argparse.Namespace) -> int:
    from hemexp.core.files import atomic_path, write_json
    from hemexp.sampling.classifier import HEClassifier, operating_point

    cfg = config_from(args)
    clf = HEClassifier.load(_classifier_path(cfg))
    table = _classifier_table(cfg, args.patients)
    table["p_expansion"] = clf.predict_proba(table)
    report = {"threshold": clf.threshold, "train_cv": clf.report.get("train_cv"),
              "train_patients": clf.report.get("train_patients")}
    for split, grp in table.groupby("split"):
        report[f"{split}_refit"] = operating_point(grp["expansion"].to_numpy(int), grp["p_expansion"].to_numpy(),
                                                   clf.threshold)
    out = Layout.of(cfg).metrics_dir
    write_json(out / "classifier.json", report)
    with atomic_path(out / "classifier_predictions.tsv") as tmp:
        table[["patient_id", "split", "expansion", "p_expansion"]].to_csv(tmp, sep="\t", index=False,
                                                                         float_format="%.4f")
    test = report.get("test_refit", {})
    print(f"HE classifier: test AUC {test.get('auc', float('nan')):.3f}, sensitivity "
          f"{test.get('sensitivity', float('nan')):.2f}, specificity {test.get('specificity', float('nan')):.2f}")
    return 0


def _vae_and_stats(cfg: dict[str, Any], device: str | None) -> tuple[Any, dict[str, Any], Any]:
    from hemexp.core.files import read_json
    from hemexp.sampling.sampler import default_device
    from hemexp.vae.model import load_vae

    dev = default_device() if device is None else device
    layout = Layout.of(cfg)
    return load_vae(layout.vae_model, map_location=dev), read_json(layout.latent_stats), dev


def _fit_ood(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hemexp.core.files import write_json
    from hemexp.io.nifti import affine_spacing_mm
    from hemexp.preprocess.pipeline import read_summary
    from hemexp.sampling.ood import fit_envelope, model_features, pipeline_input_features
    from hemexp.sampling.simulate import PatientInput, load_baseline

    cfg = config_from(args)
    vae, stats, device = _vae_and_stats(cfg, args.device)
    rows, clinical = [], []
    for pid in tqdm(sorted(args.patients), desc="OOD envelope"):
        summary = read_summary(pid, Layout.of(cfg).preprocessed(pid))
        baseline, affine = load_baseline(PatientInput(pid, Layout.of(cfg).preprocessed(pid), {}))
        rows.append({**pipeline_input_features(cfg, pid, summary),
                     **model_features(vae, stats, baseline, affine_spacing_mm(affine)[2], cfg["sampling"]["z_margin_mm"],
                                      cfg["preprocess"]["hu_window"], device)})
        clinical.append(summary["clinical"])
    ood = cfg["sampling"]["ood"]
    envelope = fit_envelope(rows, clinical, ood["margin"], ood["rel_floor"], patients=sorted(args.patients))
    write_json(Layout.of(cfg).ood_envelope, envelope)
    print(f"OOD envelope from {len(rows)} training patients -> {Layout.of(cfg).ood_envelope}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from hemexp.core.errors import PatientInputError
    from hemexp.sampling.simulate import run_simulate

    cfg = config_from(args)
    try:
        return run_simulate(args, cfg, _settings(cfg, args))
    except (PatientInputError, ValueError, FileNotFoundError) as err:
        print(f"hemexp simulate: {err}", file=sys.stderr)
        return 2
