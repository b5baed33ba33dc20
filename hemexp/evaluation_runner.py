"""Evaluation stage driver: read the sampler's products and the references, write Table 2, adherence,
calibration and the PIT figure, and log each variant's numbers into its MLflow run.

The measurement itself lives in :mod:`hemexp.evaluate` (metric rows, Table 2, adherence),
:mod:`hemexp.metrics` and :mod:`hemexp.calibration`; this module only knows *where things are*:

* HemExp samples: ``results/samples/{v}/{p}/`` (``volumes.tsv`` + ``samples/sample_{k:02d}_{iph,ivh}.nii.gz``
  on the model grid, layout of :mod:`hemexp.reassemble`), sampled with ``sampling.flag_source``;
  extra *flag-source passes* (``evaluation.flag_source_passes``, e.g. the classifier flag for 2D-ice)
  under ``results/samples_{source}/{v}/{p}/`` — each pass is one Table 2 method;
* references: ``results/preprocessed/{p}/{bl,fu}_{iph,ivh}.nii.gz`` and ``summary.json`` (true
  expansion status); deterministic baselines: copy-baseline and, when configured,
  ``results/baselines/nnunet_{2d,3d}/{p}/{iph,ivh}.nii.gz``.

Calibration uses the same volume definition as the sampler's ``volumes.tsv`` (``total_ml`` = IPH mL +
IVH mL on the model grid), applied to the reference masks, so a sample and its truth are measured alike.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from hemexp.cohort import mask_volume_ml
from hemexp.config import sampled_variants, variants
from hemexp.errors import PatientInputError
from hemexp.evaluate import (
    adherence_table,
    copy_baseline_row,
    markdown_table,
    metrics_from_files,
    patient_means,
    table2,
    table2_footnote,
    variant_metrics,
    write_table2,
)
from hemexp.utils import atomic_path, get_logger, read_json, write_json

log = get_logger(__name__)

SAMPLE_MASK = "samples/sample_{k:02d}_{structure}.nii.gz"
VOLUME_COLUMNS = ("sample", "flag", "flag_source", "iph_ml", "ivh_ml", "total_ml", "baseline_iph_ml")
NNUNET_METHODS = {"nnunet_2d": "nnUNet-2D", "nnunet_3d": "nnUNet-3D"}
FLAG_SOURCES = ("oracle", "classifier", "external")


# ---------------------------------------------------------------------------- what to evaluate
@dataclass(frozen=True)
class SamplePass:
    """One set of sampled follow-ups: a variant sampled with one flag source, one Table 2 method."""

    method: str
    variant: str
    root: Path  # holds one {patient}/ folder per patient
    flag_source: str
    uses_flag: bool

    def patient_dir(self, patient_id: str) -> Path:
        return self.root / patient_id


def flag_source_passes(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """``evaluation.flag_source_passes`` checked: source -> flag-conditioned sampled variants.

    A source equal to ``sampling.flag_source`` is dropped (the main pass already is that source).
    Raises ``ValueError`` naming a variant that is not sampled or does not see the flag, because a
    classifier-flag row of a variant that ignores the flag would be a duplicate of its main row.
    """
    spec = cfg["evaluation"].get("flag_source_passes") or {}
    known, sampled = variants(cfg), set(sampled_variants(cfg))
    main = str(cfg["sampling"]["flag_source"])
    out: dict[str, list[str]] = {}
    for source, names in spec.items():
        if source not in FLAG_SOURCES:
            raise ValueError(f"evaluation.flag_source_passes: unknown flag source {source!r} (allowed: {FLAG_SOURCES})")
        for name in names:
            if name not in sampled:
                raise ValueError(f"evaluation.flag_source_passes.{source}: {name!r} is not a sampled variant "
                                 f"(sampled: {sorted(sampled)})")
            if not known[name].uses_flag:
                raise ValueError(f"evaluation.flag_source_passes.{source}: variant {name!r} is not flag-conditioned "
                                 "(conditioning without 'e'), a flag pass would repeat its main row")
        if source != main and names:
            out[source] = list(dict.fromkeys(names))
    return out


def pass_root(cfg: Mapping[str, Any], source: str | None) -> Path:
    """``results/samples`` (main pass) or ``results/samples_{source}`` (extra flag-source pass)."""
    return Path(cfg["results_dir"]) / ("samples" if source is None else f"samples_{source}")


def sample_passes(cfg: Mapping[str, Any]) -> list[SamplePass]:
    """The main pass of every sampled variant, then the extra flag-source passes."""
    known = variants(cfg)
    main = str(cfg["sampling"]["flag_source"])
    out = [SamplePass(v, v, pass_root(cfg, None) / v, main, known[v].uses_flag) for v in sampled_variants(cfg)]
    for source, names in flag_source_passes(cfg).items():
        out += [SamplePass(f"{v} ({source} flag)", v, pass_root(cfg, source) / v, source, True) for v in names]
    return out


def nnunet_baselines(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Configured nnU-Net baselines: config name -> Table 2 method label."""
    return {b: NNUNET_METHODS[b] for b in cfg["baselines"] if b in NNUNET_METHODS}


def method_slug(method: str) -> str:
    """A method label as a metric-key fragment: ``2D-ice (classifier flag)`` -> ``2D-ice_classifier_flag``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", method).strip("_")


# ---------------------------------------------------------------------------- reading one patient
def read_volumes(patient_id: str, path: str | Path) -> pd.DataFrame:
    """A sampler ``volumes.tsv``, checked for the columns evaluation reads."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, ValueError) as err:
        raise PatientInputError(patient_id, path, f"cannot read sample volume table: {err}") from err
    missing = [c for c in VOLUME_COLUMNS if c not in table.columns]
    if missing:
        raise PatientInputError(patient_id, path, f"volume table lacks column(s) {missing}")
    if table.empty:
        raise PatientInputError(patient_id, path, "volume table has no samples")
    return table


def reference_truth(patient_id: str, pre_dir: str | Path) -> dict[str, Any]:
    """True follow-up volumes (mL, model grid, IPH + IVH as the sampler sums them) and expansion status."""
    pre_dir = Path(pre_dir)
    summary_path = pre_dir / "summary.json"
    if not summary_path.is_file():
        raise PatientInputError(patient_id, summary_path, "preprocess summary.json missing")
    vols = {}
    for s in ("iph", "ivh"):
        path = pre_dir / f"fu_{s}.nii.gz"
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj) > 0.5
        except (OSError, ValueError) as err:
            raise PatientInputError(patient_id, path, f"cannot read follow-up mask: {err}") from err
        vols[s] = mask_volume_ml(data, tuple(float(z) for z in np.linalg.norm(img.affine[:3, :3], axis=0)))
    return {"expansion": bool(read_json(summary_path)["expansion"]), "truth_iph_ml": vols["iph"],
            "truth_ivh_ml": vols["ivh"], "truth_total_ml": vols["iph"] + vols["ivh"]}


def pass_patient_rows(sp: SamplePass, patient_id: str, pre_dir: Path,
                      truth: Mapping[str, Any]) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """(metric rows, volume rows) of one patient's samples in one pass."""
    folder = sp.patient_dir(patient_id)
    volumes = read_volumes(patient_id, folder / "volumes.tsv")
    rows = []
    for rec in volumes.to_dict("records"):
        k = int(rec["sample"])
        masks = [folder / SAMPLE_MASK.format(k=k, structure=s) for s in ("iph", "ivh")]
        metrics = metrics_from_files(patient_id, *masks, pre_dir / "fu_iph.nii.gz", pre_dir / "fu_ivh.nii.gz")
        rows.append({"method": sp.method, "variant": sp.variant, "patient_id": patient_id, "sample": k,
                     "expansion": truth["expansion"], "flag": int(rec["flag"]), "flag_source": str(rec["flag_source"]),
                     **metrics})
    vol = volumes.assign(method=sp.method, variant=sp.variant, patient_id=patient_id, uses_flag=sp.uses_flag,
                         true_expansion=truth["expansion"], truth_total_ml=truth["truth_total_ml"])
    return rows, vol


def baseline_patient_rows(cfg: Mapping[str, Any], patient_id: str, pre_dir: Path,
                          truth: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Copy-baseline row and one row per configured nnU-Net baseline whose masks exist."""
    rows = [copy_baseline_row(patient_id, pre_dir)] if "copy" in cfg["baselines"] else []
    for name, method in nnunet_baselines(cfg).items():
        folder = Path(cfg["results_dir"]) / "baselines" / name / patient_id
        masks = [folder / f"{s}.nii.gz" for s in ("iph", "ivh")]
        if not all(m.is_file() for m in masks):
            log.warning("%s: no %s prediction in %s; left out of Table 2", patient_id, method, folder)
            continue
        metrics = metrics_from_files(patient_id, *masks, pre_dir / "fu_iph.nii.gz", pre_dir / "fu_ivh.nii.gz")
        rows.append({"method": method, "patient_id": patient_id, "sample": 0, "expansion": truth["expansion"], **metrics})
    return rows


@dataclass
class EvaluationData:
    """Everything read from disk: per-sample metric rows and per-sample volume rows."""

    metrics: pd.DataFrame
    volumes: pd.DataFrame
    passes: list[SamplePass]


def collect(cfg: Mapping[str, Any], patient_ids: Sequence[str], passes: Sequence[SamplePass] | None = None
            ) -> EvaluationData:
    """Read every pass, baseline and reference of the given test patients."""
    passes = list(passes if passes is not None else sample_passes(cfg))
    metric_rows: list[dict[str, Any]] = []
    volume_frames: list[pd.DataFrame] = []
    for pid in sorted(patient_ids):
        pre_dir = Path(cfg["results_dir"]) / "preprocessed" / pid
        truth = reference_truth(pid, pre_dir)
        metric_rows += baseline_patient_rows(cfg, pid, pre_dir, truth)
        for sp in passes:
            rows, vols = pass_patient_rows(sp, pid, pre_dir, truth)
            metric_rows += rows
            volume_frames.append(vols)
    if not metric_rows:
        raise ValueError("nothing to evaluate: no test patients")
    volumes = pd.concat(volume_frames, ignore_index=True) if volume_frames else pd.DataFrame()
    return EvaluationData(pd.DataFrame(metric_rows), volumes, passes)


# ---------------------------------------------------------------------------- HTML for the report
def write_html(path: str | Path, title: str, sections: Sequence[tuple[str, pd.DataFrame]],
               notes: Sequence[str] = ()) -> None:
    """Small self-contained HTML page of tables (Snakemake's report shows HTML inline, Markdown not)."""
    style = ("body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
             "pre{white-space:pre-wrap}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{style}</style></head><body><h2>{html.escape(title)}</h2>"]
    for heading, frame in sections:
        if heading:
            parts.append(f"<h3>{html.escape(heading)}</h3>")
        parts.append(frame.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.3g}", border=0))
    parts += [f"<pre>{html.escape(n)}</pre>" for n in notes if n]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(parts) + "</body></html>\n")


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


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


def fmt_floats(frame: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Floats rounded for Markdown (CSV/JSON keep full precision)."""
    out = frame.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].map(lambda v: "-" if pd.isna(v) else f"{v:.{digits}g}")
    return out


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
    from hemexp.calibration import calibration_summary, patient_calibration, rank_histogram

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
    from hemexp.calibration import calibration_note
    from hemexp.figures_eval import plot_pit_histogram

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
    from hemexp.evaluate import log_variant_results

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
    results = Path(cfg["results_dir"])
    out_dir, fig_dir = results / "metrics", results / "figures"
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


# ---------------------------------------------------------------------------- workflow report
def report_command(workflow: Any, report_path: str) -> list[str] | None:
    """The ``snakemake --report`` command that reproduces a finished run's DAG, or None to skip.

    Only a run of the default target has every report() file (no explicit targets, --until,
    --omit-from, --allowed-rules, --touch). Same interpreter, Snakefile, --configfile and --config as
    the run; --nolock because the finished run still holds the lock while its onsuccess handler runs.
    """
    ds = workflow.dag_settings
    if workflow.touch or ds.targets or ds.target_jobs or ds.until or ds.omit_from or ds.allowed_rules:
        return None
    import sys

    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(workflow.main_snakefile), "--nolock",
           "--report", str(report_path)]
    configfiles = [str(f) for f in workflow.overwrite_configfiles]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    if workflow.config_settings.config_args:
        cmd += ["--config", *workflow.config_settings.config_args]
    return cmd


def build_report(workflow: Any, report_path: str) -> int | None:
    """Write the HTML report after a full run (the Snakefile's onsuccess); returns the exit code.

    A failure prints the command to rerun by hand and does not turn the finished run into a failed one.
    """
    import subprocess
    import sys

    cmd = report_command(workflow, report_path)
    if cmd is None:
        return None
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        print(f"WARNING: building the report failed (exit {code}); rerun by hand: {' '.join(cmd)}", file=sys.stderr)
    return code
