"""Evaluation stage driver: read the sampler's products and the references, write Table 2, adherence,
calibration and the PIT figure, and log each variant's numbers into its MLflow run.

The measurement itself lives in :mod:`hemexp.evaluation.table2` (metric rows, Table 2, adherence),
:mod:`hemexp.evaluation.metrics` and :mod:`hemexp.evaluation.calibration`; this module only knows *where things are*:

* HemExp samples: ``results/samples/{v}/{p}/`` (``volumes.tsv`` + ``samples/sample_{k:02d}_{iph,ivh}.nii.gz``
  on the model grid, layout of :mod:`hemexp.sampling.products`), sampled with ``sampling.flag_source``;
  extra *flag-source passes* (``evaluation.flag_source_passes``, e.g. the classifier flag for 2D-ice)
  under ``results/samples_{source}/{v}/{p}/`` — each pass is one Table 2 method;
* references: ``results/preprocessed/{p}/{bl,fu}_{iph,ivh}.nii.gz`` and ``summary.json`` (true
  expansion status); deterministic baselines: copy-baseline and, when configured,
  ``results/baselines/nnunet_{2d,3d}/{p}/{iph,ivh}.nii.gz``.

Calibration uses the same volume definition as the sampler's ``volumes.tsv`` (``total_ml`` = IPH mL +
IVH mL on the model grid), applied to the reference masks, so a sample and its truth are measured alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hemexp.core.files import atomic_path, write_json
from hemexp.core.layout import Layout
from hemexp.core.runtime import get_logger
from hemexp.core.tables import fmt_floats, markdown_table, write_csv, write_html
from hemexp.evaluation.calibration import (
    calibration_note,
    calibration_summary,
    patient_calibration,
    rank_histogram,
)
from hemexp.evaluation.collect import SamplePass, collect, method_slug, sample_passes
from hemexp.evaluation.figures import plot_pit_histogram
from hemexp.evaluation.table2 import (
    adherence_table,
    log_variant_results,
    patient_means,
    table2,
    table2_footnote,
    variant_metrics,
    write_table2,
)

log = get_logger(__name__)


def _finite(d: Mapping[str, Any]) -> dict[str, float]:
    """Numbers only, NaN dropped (JSON has no NaN; DVC metrics must be numbers)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float, np.number)) and np.isfinite(v)}


# ---------------------------------------------------------------------------- Table 2
def table2_numbers(patients: pd.DataFrame) -> dict[str, float]:
    """Flat numbers of Table 2 for DVC/MLflow: ``<method>.<group>.<metric>_{mean,sd}`` per method."""
    out: dict[str, float] = {"n_test_patients": float(patients["patient_id"].nunique())}
    for method in dict.fromkeys(patients["method"]):
        out.update(variant_metrics(patients, method, prefix=method_slug(method)))
    return out


def flag_note(passes: Sequence[SamplePass]) -> str:
    """Footnote line saying where the expansion flag of each HemExp row came from."""
    parts = []
    for sp in passes:
        if sp.uses_flag:
            parts.append(f"{sp.method}: flag from {sp.flag_source}")
    if not parts:
        return ""
    return ("Expansion flag of flag-conditioned (*e) rows — " + "; ".join(parts) + ". A probabilistic source "
            "splits the samples p : 1-p between flag 1 and flag 0.")


def write_table2_products(metrics: pd.DataFrame, passes: Sequence[SamplePass], out_dir: Path,
                          n_samples: int | None) -> pd.DataFrame:
    """Per-sample rows, Table 2 (csv/md/html) and its flat JSON; returns the per-patient means."""
    write_csv(metrics, out_dir / "metrics_per_sample.csv")
    patients = patient_means(metrics)
    table = table2(patients)
    footnote = " ".join(p for p in (table2_footnote(patients, n_samples), flag_note(passes)) if p)
    write_table2(table, out_dir / "table2.csv", out_dir / "table2.md", footnote)
    write_json(out_dir / "table2.json", table2_numbers(patients))
    write_html(out_dir / "table2.html", "Table 2: follow-up synthesis by expansion status", [("", table)], [footnote])
    return patients


# ---------------------------------------------------------------------------- adherence
def adherence_frame(volumes: pd.DataFrame) -> pd.DataFrame:
    """Adherence stratified by requested flag and, separately, by true expansion status (tidy rows).

    ``stratified_by`` = ``requested_flag``: how often the generated state (paper rule on baseline vs
    sample IPH) matches the flag the model was given ("all" pools both flags); ``true_expansion``:
    the same among true expanders / non-expanders, whose ``generated_expansion_rate`` for
    non-expanders is "how often expansion was simulated for a patient who did not expand". Variants
    without flag conditioning are kept (``flag_conditioned`` False) as the no-flag reference.
    """
    samples = volumes.rename(columns={"flag": "requested_flag", "iph_ml": "sample_iph_ml",
                                      "uses_flag": "flag_conditioned"})
    keys = ("method", "flag_conditioned", "flag_source")
    parts = []
    for by in ("requested_flag", "true_expansion"):
        t = adherence_table(samples, by=(*keys, by)).rename(columns={by: "stratum"})
        t.insert(len(keys), "stratified_by", by)
        t["stratum"] = t["stratum"].astype(str)
        parts.append(t)
    return pd.concat(parts, ignore_index=True)


def adherence_numbers(table: pd.DataFrame) -> dict[str, float]:
    out = {}
    for row in table.itertuples(index=False):
        key = f"{method_slug(row.method)}.{row.stratified_by}_{row.stratum}"
        out.update(_finite({f"{key}.match_rate": row.match_rate,
                            f"{key}.generated_expansion_rate": row.generated_expansion_rate}))
    return out


def write_adherence_products(volumes: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    table = adherence_frame(volumes)
    write_csv(table, out_dir / "adherence.csv")
    write_json(out_dir / "adherence.json", adherence_numbers(table))
    note = ("Generated expansion state: paper rule (IPH growth >= 6 mL or >= 33 %) on baseline vs sample IPH "
            "volume, both on the model grid. match_rate: share of samples whose generated state equals the "
            "requested flag. Rows with flag_conditioned False come from variants that never see the flag.")
    by_flag = table[table["stratified_by"] == "requested_flag"].drop(columns="stratified_by")
    by_truth = table[table["stratified_by"] == "true_expansion"].drop(columns="stratified_by")
    with atomic_path(out_dir / "adherence.md") as tmp:
        tmp.write_text("# Expansion-state adherence\n\n## By requested flag\n\n" + markdown_table(fmt_floats(by_flag))
                       + "\n## By true expansion status\n\n" + markdown_table(fmt_floats(by_truth)) + f"\n{note}\n")
    write_html(out_dir / "adherence.html", "Expansion-state adherence",
               [("By requested flag", by_flag), ("By true expansion status", by_truth)], [note])
    return table


# ---------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """Per-method calibration: summary (one row per level), per-patient rows, rank histograms."""

    summary: pd.DataFrame
    per_patient: pd.DataFrame
    ranks: dict[str, list[int]]
    n_samples: dict[str, int]


def calibrate(volumes: pd.DataFrame, levels: Sequence[float], seed: int) -> Calibration:
    """Interval coverage and PIT rank of the true follow-up total volume, per HemExp method."""

    summaries, patients, ranks, ns = [], [], {}, {}
    for method, grp in volumes.groupby("method", sort=False):
        samples = grp.rename(columns={"total_ml": "volume_ml", "truth_total_ml": "truth_ml"})
        pp = patient_calibration(samples[["patient_id", "volume_ml", "truth_ml"]], levels, seed)
        n = int(pp["n_samples"].mode().iloc[0])
        summaries.append(calibration_summary(pp, levels).assign(method=method, n_samples=n))
        patients.append(pp.assign(method=method))
        ranks[method] = rank_histogram(pp, n).astype(int).tolist()
        ns[method] = n
    summary = pd.concat(summaries, ignore_index=True)
    summary = summary[["method", "n_samples", *[c for c in summary.columns if c not in ("method", "n_samples")]]]
    per_patient = pd.concat(patients, ignore_index=True)
    per_patient = per_patient[["method", *[c for c in per_patient.columns if c != "method"]]]
    return Calibration(summary, per_patient, ranks, ns)


def headline_method(cfg: Mapping[str, Any], passes: Sequence[SamplePass]) -> str:
    """The variant the single-method outputs show: ``evaluation.perturbation_variant`` when sampled."""
    main = [sp.method for sp in passes if sp.method == sp.variant]
    pv = cfg["evaluation"].get("perturbation_variant")
    return pv if pv in main else (main or [passes[0].method])[0]


def write_calibration_products(cal: Calibration, headline: str, out_dir: Path, pit_path: Path) -> str:
    """calibration.{csv,md,json,html}, calibration_per_patient.csv and the PIT figure of ``headline``."""

    write_csv(cal.summary, out_dir / "calibration.csv")
    write_csv(cal.per_patient, out_dir / "calibration_per_patient.csv")
    numbers: dict[str, float] = {}
    for row in cal.summary.itertuples(index=False):
        key = f"{method_slug(row.method)}.level_{row.level:g}"
        numbers.update(_finite({f"{key}.observed": row.observed, f"{key}.expected_calibrated": row.expected_calibrated,
                                f"{key}.n_inside": row.n_inside}))
    for method, counts in cal.ranks.items():  # flat numbers only: DVC metrics
        numbers.update({f"{method_slug(method)}.pit_rank_{i}": float(c) for i, c in enumerate(counts)})
    write_json(out_dir / "calibration.json", numbers)
    head = cal.summary[cal.summary["method"] == headline]
    note = calibration_note(head.drop(columns=["method", "n_samples"]), cal.n_samples[headline])
    ranks = pd.DataFrame([{"method": m, **{f"rank {i}": c for i, c in enumerate(r)}} for m, r in cal.ranks.items()])
    with atomic_path(out_dir / "calibration.md") as tmp:
        tmp.write_text("# Calibration of the follow-up total hemorrhage volume\n\n" + markdown_table(fmt_floats(cal.summary))
                       + "\n## PIT rank histograms (rank of the truth among the samples)\n\n" + markdown_table(ranks)
                       + f"\n## What these numbers can show ({headline})\n\n```\n{note}```\n")
    write_html(out_dir / "calibration.html", "Calibration of the follow-up total hemorrhage volume",
               [("Interval coverage", cal.summary), ("PIT rank histograms", ranks)], [note])
    plot_pit_histogram(np.asarray(cal.ranks[headline]), pit_path,
                       title=f"{headline}: rank of true follow-up volume ({len(head) and int(head['n_patients'].iloc[0])} "
                             "patients)")
    return note


# ---------------------------------------------------------------------------- MLflow
def variant_run_metrics(variant: str, passes: Sequence[SamplePass], patients: pd.DataFrame,
                        adherence: pd.DataFrame, cal: Calibration) -> dict[str, float]:
    """MLflow metrics of one variant: Table 2 numbers, adherence and coverage of each of its passes.

    The main pass uses prefix ``eval``; a flag-source pass ``eval_<source>_flag``.
    """
    out: dict[str, float] = {}
    for sp in passes:
        if sp.variant != variant:
            continue
        prefix = "eval" if sp.method == sp.variant else f"eval_{sp.flag_source}_flag"
        out.update(variant_metrics(patients, sp.method, prefix=prefix))
        adh = adherence[(adherence["method"] == sp.method) & (adherence["stratified_by"] == "requested_flag")]
        for row in adh.itertuples(index=False):
            out.update(_finite({f"{prefix}.adherence.flag_{row.stratum}.match_rate": row.match_rate}))
        for row in cal.summary[cal.summary["method"] == sp.method].itertuples(index=False):
            out.update(_finite({f"{prefix}.calibration.coverage_{int(round(row.level * 100))}": row.observed,
                                f"{prefix}.calibration.expected_{int(round(row.level * 100))}": row.expected_calibrated}))
    return out


def log_runs(cfg: Mapping[str, Any], passes: Sequence[SamplePass], patients: pd.DataFrame, adherence: pd.DataFrame,
             cal: Calibration, artifacts: Sequence[Path]) -> list[str]:
    """Log each variant's numbers into the MLflow run of its trained model; returns the variants logged.

    A variant without a recorded run (a model trained elsewhere and copied in) is skipped with a
    warning: the tables on disk are the product, the MLflow copy is for comparison.
    """

    logged = []
    for variant in dict.fromkeys(sp.variant for sp in passes):
        metrics = variant_run_metrics(variant, passes, patients, adherence, cal)
        try:
            log_variant_results(dict(cfg), variant, metrics, artifacts=[str(a) for a in artifacts])
        except FileNotFoundError as err:
            log.warning("MLflow: %s", err)
            continue
        logged.append(variant)
    return logged


# ---------------------------------------------------------------------------- the stage
def run_evaluation(cfg: Mapping[str, Any], patient_ids: Sequence[str], log_mlflow: bool = True) -> dict[str, Any]:
    """Evaluate every test patient: Table 2, adherence, calibration + PIT; MLflow per variant.

    Products: ``results/metrics/{table2,adherence,calibration}.{csv,md,json,html}``,
    ``metrics_per_sample.csv``, ``calibration_per_patient.csv`` and ``results/figures/pit.png``.
    """
    out_dir, fig_dir = Layout.of(cfg).metrics_dir, Layout.of(cfg).figures_dir
    passes = sample_passes(cfg)
    data = collect(cfg, patient_ids, passes)
    patients = write_table2_products(data.metrics, passes, out_dir, int(cfg["sampling"]["n_samples"]))
    adherence = write_adherence_products(data.volumes, out_dir)
    cal = calibrate(data.volumes, cfg["evaluation"]["interval_levels"], int(cfg["seed"]))
    headline = headline_method(cfg, passes)
    write_calibration_products(cal, headline, out_dir, fig_dir / "pit.png")
    artifacts = [out_dir / f"{n}.md" for n in ("table2", "adherence", "calibration")] + [fig_dir / "pit.png"]
    return {"n_patients": len(patient_ids), "methods": list(dict.fromkeys(patients["method"])), "headline": headline,
            "mlflow_logged": log_runs(cfg, passes, patients, adherence, cal, artifacts) if log_mlflow else []}


