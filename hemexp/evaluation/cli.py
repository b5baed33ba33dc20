"""Evaluation commands: ``evaluate`` (Table 2, adherence, calibration) and ``perturb {variant}`` (Fig. 3).

Both read finished products of earlier stages and write under ``results/metrics`` and
``results/figures``; a per-patient input problem stops the command with one line naming patient and
file (a table silently missing a patient would misreport the cohort).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from hemexp.core.commands import add_config_arg, config_from, report_failure
from hemexp.core.layout import Layout


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Table 2, adherence and calibration of every sampled variant "
                                        "-> results/metrics/, results/figures/pit.png")
    p.add_argument("--patients", nargs="+", default=None, help="test patients (default: the cohort's test split)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log into the variants' MLflow runs")
    add_config_arg(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("perturb", help="clinical perturbations and guidance sweep of one variant "
                                       "-> results/metrics/perturbation.*, results/figures/perturbation.png")
    p.add_argument("variant", nargs="?", default=None, help="diffusion variant (default: evaluation.perturbation_variant)")
    p.add_argument("--patients", nargs="+", default=None, help="test patients (default: the cohort's test split)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log into the variant's MLflow run")
    add_config_arg(p)
    p.set_defaults(func=_perturb)

    p = sub.add_parser("validity-sample", help="validity study: sample every test patient for one variant "
                                               "-> results/validity/samples/<variant>.csv")
    p.add_argument("variant", help="diffusion variant (one of evaluation.validity.variants)")
    p.add_argument("--patients", nargs="+", default=None, help="test patients (default: the cohort's test split)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_config_arg(p)
    p.set_defaults(func=_validity_sample)

    p = sub.add_parser("validity-report", help="validity study tables, targets and figure of every studied "
                                               "variant -> results/validity/")
    p.add_argument("--patients", nargs="+", default=None, help="test patients (default: the cohort's test split)")
    add_config_arg(p)
    p.set_defaults(func=_validity_report)


def _test_patients(cfg: dict[str, Any], given: list[str] | None) -> list[str]:
    from hemexp.cohort.patients import patients

    return sorted(given) if given else sorted(p.patient_id for p in patients(cfg) if p.split == "test")


def _evaluate(args: argparse.Namespace) -> int:
    from hemexp.core.errors import PatientInputError
    from hemexp.evaluation.run import run_evaluation

    cfg = config_from(args)
    ids = _test_patients(cfg, args.patients)
    if not ids:
        print("hemexp evaluate: the cohort has no test patients", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        summary = run_evaluation(cfg, ids, log_mlflow=not args.no_mlflow)
    except PatientInputError as err:
        report_failure(cfg, "evaluate", err)
        return 1
    print(f"evaluated {summary['n_patients']} test patients, methods {summary['methods']} "
          f"({time.perf_counter() - t0:.1f} s); MLflow runs updated: {summary['mlflow_logged'] or 'none'}")
    return 0


def _perturb(args: argparse.Namespace) -> int:
    from hemexp.core.config import variants
    from hemexp.core.errors import PatientInputError

    cfg = config_from(args)
    variant = args.variant or cfg["evaluation"]["perturbation_variant"]
    known = variants(cfg)
    if variant not in known:
        print(f"hemexp perturb: unknown variant {variant!r} (configured: {sorted(known)})", file=sys.stderr)
        return 2
    if not known[variant].uses_clinical:
        print(f"hemexp perturb: variant {variant!r} has no clinical conditioning; perturbing clinical inputs "
              "cannot change its samples", file=sys.stderr)
        return 2
    ids = _test_patients(cfg, args.patients)
    if not ids:
        print("hemexp perturb: the cohort has no test patients", file=sys.stderr)
        return 2
    try:
        numbers = _run_perturb(cfg, variant, ids, args.device, not args.no_mlflow)
    except PatientInputError as err:
        report_failure(cfg, "perturb", err)
        return 1
    sep = {k: round(v, 2) for k, v in numbers.items() if k.endswith("separation_mean")}
    print(f"{variant}: perturbation study of {len(ids)} patients in {numbers['runtime_s']:.1f} s "
          f"({numbers['sampler_calls']:.0f} sampler calls); separation by scale {sep}")
    return 0


def _run_perturb(cfg: dict[str, Any], variant: str, ids: list[str], device: str | None, log_mlflow: bool
                 ) -> dict[str, float]:

    from hemexp.core.runtime import get_logger
    from hemexp.evaluation.guidance.run import run_study, study_settings, trained_loader, write_study_products
    from hemexp.sampling.sampler import SamplerSettings, load_bundle
    from hemexp.sampling.scenarios import scenarios_from_config

    ev = cfg["evaluation"]
    single, profiles = scenarios_from_config(ev)
    default_scale = float(cfg["sampling"]["guidance_scale"])
    settings = study_settings(single, profiles, ev["guidance_scales"], default_scale)
    model = Layout.of(cfg).diffusion_model(variant)
    bundle = load_bundle(Layout.of(cfg).vae_model, model, Layout.of(cfg).latent_stats, device)
    loader = trained_loader(cfg, bundle, SamplerSettings.from_config(cfg["sampling"]), int(ev["n_samples"]))
    result = run_study(ids, loader, settings)
    numbers = write_study_products(cfg, variant, result, single, default_scale)
    if log_mlflow:
        from hemexp.evaluation.table2 import log_variant_results

        layout = Layout.of(cfg)
        try:
            log_variant_results(cfg, variant, {f"perturb.{k}": v for k, v in numbers.items()},
                                artifacts=[layout.figure("perturbation.png"),
                                           layout.metric("perturbation.md")], artifact_path="perturbation")
        except FileNotFoundError as err:
            get_logger(__name__).warning("MLflow: %s", err)
    return numbers


def _validity_sample(args: argparse.Namespace) -> int:
    from hemexp.core.config import unknown_variant
    from hemexp.core.errors import PatientInputError
    from hemexp.evaluation.validity.study import run_validity_sampling

    cfg = config_from(args)
    problem = unknown_variant(cfg, args.variant, "validity-sample")
    ids = _test_patients(cfg, args.patients)
    if problem or not ids:
        print(problem or "hemexp validity-sample: the cohort has no test patients", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        table = run_validity_sampling(cfg, args.variant, ids, args.device)
    except PatientInputError as err:
        report_failure(cfg, "validity-sample", err)
        return 1
    print(f"{args.variant}: {len(table)} validity samples of {len(ids)} test patients in "
          f"{time.perf_counter() - t0:.1f} s -> {Layout.of(cfg).validity_volumes(args.variant)}")
    return 0


def _validity_report(args: argparse.Namespace) -> int:
    from hemexp.core.errors import PatientInputError
    from hemexp.evaluation.validity.names import studied_variants
    from hemexp.evaluation.validity.report import write_validity_report

    cfg = config_from(args)
    if cfg["cohort"]["source"] != "synthetic":
        print("hemexp validity-report: the validity study needs the synthetic cohort's ground truth "
              "(cohort.source: synthetic)", file=sys.stderr)
        return 2
    ids = _test_patients(cfg, args.patients)
    try:
        numbers = write_validity_report(cfg, ids, studied_variants(cfg))
    except PatientInputError as err:
        report_failure(cfg, "validity-report", err)
        return 1
    met = {k.removesuffix(".targets_met"): int(v) for k, v in numbers.items() if k.endswith(".targets_met")}
    print(f"validity study of {len(ids)} test patients -> {Layout.of(cfg).validity_dir}; targets met per "
          f"variant: {met}")
    return 0
