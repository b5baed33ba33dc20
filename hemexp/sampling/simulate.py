"""Simulate follow-ups of one patient: the per-patient driver of ``hemexp sample`` and ``hemexp simulate``.

:func:`simulate_patient` takes a preprocessed baseline (model grid + transforms, the layout of
``results/preprocessed/{p}/``), raw clinical values and a flag plan, samples N follow-ups and writes
every product (see :mod:`hemexp.sampling.products`) into one folder, atomically.

``hemexp simulate`` serves a single new patient from files: :func:`prepare_baseline` is the
*baseline-only* preprocessing path: the pipeline's own step functions (:mod:`hemexp.preprocess.pipeline`:
ingest one scan → lesion-safe skull strip → rigid registration to the template → model-grid resampling),
without a follow-up scan, so a simulated patient goes through exactly the steps of a pipeline patient.
Scenario overrides (``--set anticoagulant=1 --set onset_to_ct_h=+6``) become a
:class:`hemexp.sampling.scenarios.Scenario`, applied and clamped by :func:`hemexp.sampling.scenarios.apply_scenario`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from hemexp.core.clinical import (
    CLINICAL_BY_NAME,
    CLINICAL_NAMES,
    VALID_RANGES,
    clinical_vector,
    mask_volume_ml,
)
from hemexp.core.errors import PatientInputError
from hemexp.core.files import atomic_dir, read_json, write_json
from hemexp.core.layout import BASELINE_FILES
from hemexp.io.masks import read_mask
from hemexp.io.nifti import affine_spacing_mm, make_image, save_nifti, spacing_mm
from hemexp.preprocess.pipeline import (
    KINDS,
    lesion_safe_brain,
    load_scan,
    resample_timepoint,
    skull_stripped,
    template_grid,
    write_on_grid,
)
from hemexp.preprocess.register import (
    MODEL_GRID,
    TRANSFORMS_DIR,
    nib_to_ants,
    register_baseline,
    save_native_grid,
    template_on_grid,
    template_similarity,
)
from hemexp.sampling.figure import sample_figure
from hemexp.sampling.flags import FlagPlan, classifier_probability, parse_flag_source, plan_flags
from hemexp.sampling.ood import OodRequest, native_features, registration_features, score_baseline, warn
from hemexp.sampling.products import (
    baseline_volumes,
    probability_maps,
    sample_volumes,
    summarise,
    volume_table,
    write_dicom_products,
    write_products,
)
from hemexp.sampling.sampler import generate_followups, load_bundle
from hemexp.sampling.scenarios import Change, Scenario, apply_scenario
from hemexp.tracking.registry import bundle_config, resolve_models


@dataclass
class PatientInput:
    """One patient to sample: preprocessed baseline folder, raw clinical values, optional truth."""

    patient_id: str
    patient_dir: Path
    clinical: dict[str, float]
    followup: dict[str, np.ndarray] | None = None  # true follow-up IPH/IVH on the model grid, if known


@dataclass(frozen=True)
class DicomRequest:
    """Write DICOM outputs: the native baseline CT NIfTI they are built on, and sidecar facts (model
    version, config hash) that only the caller knows."""

    native_ct: Path
    facts: Mapping[str, Any]


def load_grid_scan(patient: PatientInput, files: Sequence[str], what: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(``{ct, iph, ivh}`` model-grid arrays, grid affine) of one preprocessed time point; ``files`` are
    its CT, IPH and IVH file names (:data:`~hemexp.core.layout.BASELINE_FILES` or ``FOLLOWUP_FILES``)."""
    out, affine = {}, None
    for key, name in zip(("ct", "iph", "ivh"), files, strict=True):
        path = patient.patient_dir / name
        if not path.is_file():
            raise PatientInputError(patient.patient_id, path, f"preprocessed {what} file missing")
        if key == "ct":
            img = nib.load(str(path))
            out[key], grid = np.asarray(img.dataobj, dtype=np.float32), img.affine
        else:
            out[key], grid = read_mask(path, patient.patient_id, f"{what} {key.upper()} mask")
        affine = grid if affine is None else affine
    return out, np.asarray(affine)


def load_baseline(patient: PatientInput) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(``{ct, iph, ivh}`` model-grid arrays, grid affine) of a preprocessed baseline."""
    out, affine = load_grid_scan(patient, BASELINE_FILES, "baseline")
    if not out["iph"].any():
        raise PatientInputError(patient.patient_id, patient.patient_dir / BASELINE_FILES[1],
                                "baseline IPH is empty on the model grid: nothing to simulate")
    return out, affine


def simulate_patient(bundle: Any, patient: PatientInput, plan: FlagPlan, settings: Any, sampling_cfg: Mapping[str, Any],
                     hu_window: Sequence[float], out_dir: str | Path, variant: str, progress: Any = None,
                     extra: Mapping[str, Any] | None = None, copy_dirs: Mapping[str, Path] | None = None,
                     dicom: DicomRequest | None = None, ood: OodRequest | None = None) -> dict[str, Any]:
    """Sample ``plan``'s follow-ups of one patient and write every product into ``out_dir`` (atomic).

    ``extra`` is merged into summary.json; ``copy_dirs`` (name -> folder) are copied into the products;
    ``dicom`` (when given and the patient has native transforms) adds ``dicom/``
    (:func:`hemexp.sampling.products.write_dicom_products`); ``ood`` scores the loaded baseline with the
    out-of-distribution gate before sampling (summary ``ood``, warnings on stderr).
    """

    t0 = time.perf_counter()
    baseline, affine = load_baseline(patient)
    spacing = affine_spacing_mm(affine)
    scores = None
    if ood is not None:
        scores = score_baseline(ood, bundle.vae, bundle.stats, baseline, spacing[2], sampling_cfg["z_margin_mm"],
                                hu_window, bundle.device)
        warn(scores, patient.patient_id)
    fs = generate_followups(bundle, baseline, spacing[2], clinical_vector(patient.clinical), plan.all_flags, settings,
                            sampling_cfg["z_margin_mm"], sampling_cfg["mask_threshold"], hu_window, progress)
    t1 = time.perf_counter()
    vols = sample_volumes(fs.zs, {"ct": fs.ct_hu, "iph": fs.iph, "ivh": fs.ivh}, baseline)
    maps = probability_maps(vols, baseline, plan.all_flags, plan.weights)
    split = {k: v[: plan.n_samples] for k, v in vols.items()}
    meta = {"patient_id": patient.patient_id, "variant": variant, "guidance_scale": settings.guidance_scale}
    table = volume_table(split, baseline, plan, spacing, meta)
    truth = None
    if patient.followup is not None:
        iph, ivh = (mask_volume_ml(patient.followup[k], spacing) for k in ("iph", "ivh"))
        truth = {"iph": iph, "ivh": ivh, "total": iph + ivh}
    summary = summarise(table, plan, baseline_volumes(baseline, spacing), truth)
    timings = {**fs.info.pop("timings_s"), "reassemble_s": time.perf_counter() - t1}
    summary.update(
        patient_id=patient.patient_id, variant=variant, clinical=patient.clinical, n_samples=plan.n_samples,
        seed=settings.seed, guidance_scale=settings.guidance_scale, ddim_steps=settings.steps, solver=settings.solver, eta=settings.eta,
        mask_threshold=sampling_cfg["mask_threshold"], z_margin_mm=sampling_cfg["z_margin_mm"],
        sampled_slices=[int(fs.zs[0]), int(fs.zs[-1])], grid={"shape": list(baseline["ct"].shape), "spacing_mm": spacing},
        sampler=fs.info, **dict(extra or {}),
    )
    if scores is not None:
        summary["ood"] = scores
    native = (patient.patient_dir / "transforms").is_dir()
    with atomic_dir(out_dir) as tmp:
        t2 = time.perf_counter()
        for name, src in (copy_dirs or {}).items():
            shutil.copytree(src, tmp / name)
        sample_figure(tmp / "figure.png", baseline, split, maps, table, summary, fs.zs, patient.followup)
        summary["files"] = write_products(tmp, split, maps, table, affine, patient.patient_dir if native else None)
        if dicom is not None and native:
            summary["files"]["dicom"] = write_dicom_products(tmp, table, summary, dicom.native_ct, dict(dicom.facts))
        summary["timings_s"] = {**timings, "write_s": time.perf_counter() - t2, "total_s": time.perf_counter() - t0}
        write_json(tmp / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- baseline-only preprocessing


def prepare_baseline(cfg: dict[str, Any], patient_id: str, ct_path: str | Path, iph_path: str | Path,
                     ivh_path: str | Path | None, out_dir: str | Path, native_ct: Path | None = None) -> dict[str, Any]:
    """Ingest, skull-strip, register (rigid, to the template) and resample one baseline scan.

    Writes ``bl_{ct,iph,ivh}.nii.gz``, ``brain_bl.nii.gz``, ``transforms/`` and ``summary.json`` into
    ``out_dir`` — the subset of ``results/preprocessed/{p}/`` that sampling and :func:`to_native` need.
    ``ivh_path`` None means no IVH (an empty mask); the same path for IPH and IVH means a label map
    (``cohort.mask_labels``). ``native_ct``: also save the ingested (native-grid) CT there, the base of
    the DICOM outputs. Returns the summary.
    """

    pre = cfg["preprocess"]
    t0 = time.perf_counter()
    scan = load_scan(ct_path, iph_path, ivh_path, cfg["cohort"]["mask_labels"], patient_id)
    ct, masks = scan["ct"], {k: scan[k] for k in KINDS}
    native_ml = {k: mask_volume_ml(np.asarray(m.dataobj), spacing_mm(ct)) for k, m in masks.items()}
    if native_ml["iph"] == 0:
        raise PatientInputError(patient_id, iph_path, "baseline IPH mask is empty (no hemorrhage to model)")
    brain, strip = lesion_safe_brain(ct, masks["iph"], masks["ivh"], cfg, patient_id)
    stripped = skull_stripped(ct, brain)
    if native_ct is not None:
        save_nifti(ct, native_ct, np.float32)
    t1 = time.perf_counter()
    template, tmask, grid = template_grid(cfg)
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(prefix="hemexp_sim_") as work:
        register_baseline(nib_to_ants(template), nib_to_ants(stripped), cfg["seed"], pre["registration_mm"],
                          tmp / TRANSFORMS_DIR, work)
        grid.save(tmp / TRANSFORMS_DIR / MODEL_GRID)
        save_native_grid(ct, tmp)
        t2 = time.perf_counter()
        vols = resample_timepoint(stripped, make_image(brain, ct.affine), masks, tmp, "bl")
        write_on_grid(grid, vols, tmp)
        grid_ml = {k: mask_volume_ml(vols[f"bl_{k}"], grid.spacing) for k in KINDS}
        if grid_ml["iph"] == 0:
            raise PatientInputError(patient_id, iph_path, "baseline IPH lies outside the model grid after registration")
        similarity = template_similarity(vols["bl_ct"], vols["bl_brain"], *template_on_grid(template, tmask, grid),
                                         grid.spacing, tuple(pre["hu_window"]))
        summary = {"patient_id": patient_id, "volumes_ml": {"baseline": {**native_ml, "total": sum(native_ml.values())}},
                   "volumes_ml_model_grid": {"baseline": {**grid_ml, "total": sum(grid_ml.values())}},
                   "grid": {"spacing_mm": list(grid.spacing), "shape": list(grid.shape)}, "skullstrip": strip,
                   "registration": {"template_similarity": similarity},
                   "native_features": native_features(ct, np.asarray(brain) > 0),
                   "timings_s": {"ingest_skullstrip": t1 - t0, "registration": t2 - t1,
                                 "resample": time.perf_counter() - t2}}
        write_json(tmp / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- clinical values and scenarios


def parse_assignments(items: Sequence[str] | None, what: str) -> dict[str, str]:
    """``["key=value", ...]`` -> dict; a malformed item or unknown clinical key raises ValueError."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ValueError(f"{what}: expected key=value, got {item!r}")
        if key not in CLINICAL_BY_NAME:
            raise ValueError(f"{what}: unknown clinical variable {key!r} (allowed: {', '.join(CLINICAL_NAMES)})")
        out[key] = value.strip()
    return out


def clinical_values(given: Mapping[str, Any], measured_iph_ml: float) -> dict[str, float]:
    """All seven raw clinical values, checked against the manifest's plausibility ranges.

    ``baseline_iph_ml`` defaults to the measured baseline mask volume (native space, mL).
    """
    values = dict(given)
    values.setdefault("baseline_iph_ml", round(float(measured_iph_ml), 3))
    missing = [n for n in CLINICAL_NAMES if n not in values]
    if missing:
        raise ValueError(f"clinical value(s) missing: {', '.join(missing)} (give --clinical key=value or a JSON)")
    out = {}
    for name in CLINICAL_NAMES:
        try:
            v = float(values[name])
        except (TypeError, ValueError):
            raise ValueError(f"clinical {name}: {values[name]!r} is not a number") from None
        lo, hi = VALID_RANGES[name]
        if not lo <= v <= hi or (CLINICAL_BY_NAME[name].binary and v not in (0.0, 1.0)):
            raise ValueError(f"clinical {name}: {v:g} is not plausible (range [{lo:g}, {hi:g}]"
                             f"{', binary' if CLINICAL_BY_NAME[name].binary else ''})")
        out[name] = v
    return out


def scenario_from_sets(items: Sequence[str] | None) -> Scenario:
    """``--set`` overrides as a scenario: '+x'/'-x' = add x, 'toggle' = flip a binary, else set."""
    changes = []
    for key, value in parse_assignments(items, "--set").items():
        if value == "toggle":
            changes.append(Change(key, "toggle"))
            continue
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--set {key}: {value!r} is not a number, +x, -x or 'toggle'") from None
        changes.append(Change(key, "add" if value[0] in "+-" else "set", number))
    return Scenario("cli", tuple(changes))


# ----------------------------------------------------------------------------- model folder


def model_files(models_dir: str | Path, variant: str) -> dict[str, Path | None]:
    """Trained products under a model folder laid out as ``results/models`` (stats and template may
    also sit beside it, as in ``results/``): vae, diffusion, stats, classifier, template, template_mask."""
    models = Path(models_dir)
    parent = models.parent

    def first(*paths: Path) -> Path | None:
        return next((p for p in paths if p.is_file()), None)

    return {
        "vae": first(models / "vae" / "vae.pt"),
        "diffusion": first(models / "diffusion" / variant / "model.pt"),
        "stats": first(models / "latents" / "stats.json", parent / "latents" / "stats.json"),
        "classifier": first(models / "classifier" / "classifier.joblib"),
        "ood": first(models / "ood" / "envelope.json"),
        "template": first(models / "template" / "template.nii.gz", parent / "template" / "template.nii.gz"),
        "template_mask": first(models / "template" / "template_mask.nii.gz",
                               parent / "template" / "template_mask.nii.gz"),
    }


MODEL_GRID_KEYS = ("spacing_mm", "crop", "hu_window", "registration_mm")  # what a trained model fixes


def with_model_grid(cfg: dict[str, Any], trained: Mapping[str, Any] | None) -> dict[str, Any]:
    """``cfg`` with the model-grid keys of a released bundle's training config: a model trained on a
    64x64 grid at 3 mm must see its input on that grid, whatever the local config says."""
    import copy

    if not trained:
        return cfg
    cfg = copy.deepcopy(cfg)
    for key in MODEL_GRID_KEYS:
        cfg["preprocess"][key] = trained["preprocess"][key]
    return cfg


def read_clinical_json(path: str | Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: clinical JSON must be an object of variable: value")
    return data


# ----------------------------------------------------------------------------- `hemexp simulate`


def resolve_template(cfg: dict[str, Any], args: Any, files: Mapping[str, Path | None]) -> dict[str, Any]:
    """A config copy whose preprocess.template is --template, else the configured one, else the one
    found beside the model folder (the template the models were trained on)."""
    import copy

    cfg = copy.deepcopy(cfg)
    pre = cfg["preprocess"]
    if args.template:
        pre.update(template=str(args.template), template_mask=str(args.template_mask) if args.template_mask else None)
    elif not pre["template"]:
        if files["template"] is None:
            raise FileNotFoundError("no CT template: give --template, set preprocess.template, or keep the pipeline's "
                                    "template/ folder beside the model folder")
        pre.update(template=str(files["template"]),
                   template_mask=str(files["template_mask"]) if files["template_mask"] else None)
    return cfg


def simulate_dicom_request(cfg: dict[str, Any], ct_path: str | Path, native_ct: Path, variant: str) -> DicomRequest | None:
    """``sampling.dicom_output`` for ``hemexp simulate`` (``auto``: on when ``ct_path`` is a DICOM folder)."""
    from hemexp.core.config import config_hash
    from hemexp.io.dicom_seg import dicom_output_enabled, hemexp_version

    fmt = "dicom" if Path(ct_path).is_dir() else "nifti"
    if not dicom_output_enabled(cfg["sampling"].get("dicom_output", "auto"), fmt):
        return None
    return DicomRequest(native_ct, {"model": {"hemexp_version": hemexp_version(), "variant": variant},
                                    "config_hash": config_hash(cfg), "baseline_input_format": fmt})


def run_simulate(args: Any, cfg: dict[str, Any], settings: Any) -> int:
    """``hemexp simulate``: preprocess the baseline, sample, write products, print the summary table."""

    models = resolve_models(args.models, cfg)
    cfg = with_model_grid(cfg, bundle_config(models))
    variant = args.variant or cfg["evaluation"].get("perturbation_variant") or next(iter(cfg["diffusion"]["variants"]))
    files = model_files(models, variant)
    missing = [k for k in ("vae", "diffusion", "stats") if files[k] is None]
    if missing:
        raise FileNotFoundError(f"model folder {models} lacks {', '.join(missing)} for variant {variant!r} "
                                "(expected vae/vae.pt, diffusion/<variant>/model.pt, latents/stats.json)")
    cfg = resolve_template(cfg, args, files)
    source = parse_flag_source(args.flag)
    if source in ("oracle", "external"):
        raise ValueError(f"--flag {source} needs a follow-up or a manifest; give 0, 1, a probability or 'classifier'")
    if source == "classifier" and files["classifier"] is None:
        raise FileNotFoundError(f"--flag classifier: {models}/classifier/classifier.joblib not found "
                                "(hemexp train-classifier), or give --flag 0, 1 or a probability")
    given = {**(read_clinical_json(args.clinical_json) if args.clinical_json else {}),
             **parse_assignments(args.clinical, "--clinical")}
    scenario = scenario_from_sets(args.overrides)
    with tempfile.TemporaryDirectory(prefix="hemexp_simulate_") as work:
        prep_dir = Path(work) / "baseline"
        dicom = simulate_dicom_request(cfg, args.ct, Path(work) / "native_bl_ct.nii.gz", variant)
        prep = prepare_baseline(cfg, args.patient_id, args.ct, args.iph, args.ivh, prep_dir,
                                None if dicom is None else dicom.native_ct)
        native = prep["volumes_ml"]["baseline"]
        clinical = clinical_values(given, native["iph"])
        used = {k: float(v) for k, v in apply_scenario(clinical, scenario).items()}
        if source == "classifier":

            p, label = classifier_probability(str(files["classifier"]), {**used, "baseline_ivh_ml": native["ivh"]}), "classifier"
        else:
            p, label = float(source), "user" if source in (0.0, 1.0) else "probability"
        plan = plan_flags(p, args.n_samples or cfg["sampling"]["n_samples"], label)
        bundle = load_bundle(files["vae"], files["diffusion"], files["stats"], args.device)
        ood = OodRequest({**prep.get("native_features", {}),
                          **registration_features(prep.get("registration", {}).get("template_similarity"))},
                         clinical, apply_scenario(clinical, scenario, clamp=False), files["ood"])
        extra = {"clinical_given": clinical, "scenario": [c.__dict__ for c in scenario.changes],
                 "baseline_native_ml": native, "models": str(models), "template": cfg["preprocess"]["template"],
                 "flag_used_by_model": bool(bundle.diffusion.uses_flag)}
        with _progress(args.no_progress) as progress:
            summary = simulate_patient(bundle, PatientInput(args.patient_id, prep_dir, used), plan, settings,
                                       cfg["sampling"], cfg["preprocess"]["hu_window"], args.out, variant,
                                       progress=progress, extra=extra, copy_dirs={"baseline": prep_dir}, dicom=dicom,
                                       ood=ood)
    print_summary(summary, args.out)
    return 0


class _progress:
    """A rich progress bar over U-Net calls, as the sampler's progress callback (or nothing)."""

    def __init__(self, disabled: bool):
        self.disabled, self.bar, self.task = disabled, None, None

    def __enter__(self) -> Any:
        if self.disabled:
            return None
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.__enter__()
        self.task = self.bar.add_task("sampling (U-Net calls)", total=None)
        return self

    def __call__(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def print_summary(summary: dict[str, Any], out: str | Path) -> None:
    """The terminal summary: volume distribution, P(expansion), P(IVH), flag and where products went."""
    from rich.console import Console
    from rich.table import Table

    fu, base = summary["followup_ml"], summary["baseline_ml"]
    table = Table(title=f"HemExp simulation — {summary['patient_id']} ({summary['variant']}, "
                        f"{summary['n_samples']} samples)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for kind, label in (("iph", "IPH"), ("total", "total hemorrhage")):
        lo, hi = fu[kind]["interval_80"]
        table.add_row(f"baseline {label} (mL)", f"{base[kind]:.1f}")
        table.add_row(f"follow-up {label} median [80 % interval] (mL)", f"{fu[kind]['median']:.1f} [{lo:.1f}, {hi:.1f}]")
    table.add_row("P(expansion)", f"{summary['p_expansion']:.2f}")
    table.add_row("P(IVH at follow-up)", f"{summary['p_ivh']:.2f}")
    flag = summary["flag"]
    table.add_row("expansion flag", f"{flag['source']} p={flag['p']:.2f} ({flag['n_flag1']} x 1, {flag['n_flag0']} x 0)")
    ood = summary.get("ood")
    if ood is not None:
        n = len(ood["warnings"])
        table.add_row("out-of-distribution warnings", "none" if not n else f"{n} (see above and summary.json ood)")
    table.add_row("products", str(out))
    Console().print(table)
