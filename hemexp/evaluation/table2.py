"""Follow-up synthesis evaluation: per-sample metric rows, Table 2, copy-baseline, adherence, MLflow.

Data model (plain pandas, so the sampling stage, nnU-Net baselines and tests all feed the same code):

* **sample rows** — one row per (method, patient, sample): ``method``, ``patient_id``, ``sample``,
  ``expansion`` (the patient's *true* follow-up expansion status, which stratifies Table 2) and the
  flat metric keys of :func:`hemexp.evaluation.metrics.hemorrhage_metrics` (``iph_mae`` … ``total_dice``).
  Deterministic methods (copy-baseline, nnU-Net) contribute one sample per patient.
* **patient rows** — :func:`patient_means`: the mean over a patient's samples, so a patient with
  five samples weighs as much as a patient with one prediction.
* **Table 2** — :func:`table2`: rows grouped by expansion status and method, cells ``mean(sd)`` over
  patients, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hemexp.baselines.nnunet.dataset import NNUNET_BASELINES
from hemexp.core.clinical import is_expansion
from hemexp.core.errors import PatientInputError
from hemexp.core.files import atomic_path
from hemexp.core.layout import Layout
from hemexp.core.tables import markdown_table, write_csv
from hemexp.evaluation.metrics import EMPTY_MASK_CONVENTION, METRICS, hemorrhage_metrics
from hemexp.io.masks import read_mask
from hemexp.io.nifti import affine_spacing_mm, grid_mismatch
from hemexp.preprocess.pipeline import read_summary
from hemexp.tracking.runs import RUN_ID_FILE, log_to_model_run

COPY_BASELINE = "copy-baseline"
BASELINE_ORDER = (COPY_BASELINE, *(b.method for b in NNUNET_BASELINES.values()))  # Table 2 row order
GROUPS = ((True, "Expansion"), (False, "Non-exp."))
TABLE_METRICS = ("mae", "assd", "cov")
METRIC_LABELS = {"mae": "MAE (mL)", "assd": "ASSD (mm)", "cov": "COV"}
STRUCTURE_LABELS = {"iph": "IPH", "total": "Total"}
METRIC_COLUMNS = tuple(f"{s}_{m}" for s in ("iph", "total") for m in METRICS)


# ---------------------------------------------------------------------------- metric rows from files
def metrics_from_files(patient_id: str, pred_iph: str | Path, pred_ivh: str | Path,
                       ref_iph: str | Path, ref_ivh: str | Path) -> dict[str, float]:
    """Metric row of one predicted follow-up (NIfTI masks) against the reference masks.

    The prediction must lie on the reference grid (:func:`hemexp.io.nifti.grid_mismatch`); anything
    else is a per-patient input error rather than a silent resampling. Spacing comes from the
    reference affine.
    """
    ref_i, aff = read_mask(ref_iph, patient_id, "reference IPH mask")
    ref_v, aff_v = read_mask(ref_ivh, patient_id, "reference IVH mask")
    pred_i, aff_pi = read_mask(pred_iph, patient_id, "predicted IPH mask")
    pred_v, aff_pv = read_mask(pred_ivh, patient_id, "predicted IVH mask")
    for path, arr, a in ((ref_ivh, ref_v, aff_v), (pred_iph, pred_i, aff_pi), (pred_ivh, pred_v, aff_pv)):
        problem = grid_mismatch(arr.shape, a, ref_i.shape, aff, what="mask", ref_what="reference")
        if problem:
            raise PatientInputError(patient_id, path, f"{problem}; reference: {ref_iph}")
    return hemorrhage_metrics(pred_i, pred_v, ref_i, ref_v, affine_spacing_mm(aff))


def copy_baseline_row(patient_id: str, preprocessed_dir: str | Path) -> dict[str, Any]:
    """Copy-baseline sample row of one patient: the baseline masks predict the follow-up.

    Reads ``results/preprocessed/{p}/{bl,fu}_{iph,ivh}.nii.gz`` (model grid) and ``summary.json``
    for the true expansion status.
    """
    d = Path(preprocessed_dir)
    summary = read_summary(patient_id, d)
    row = metrics_from_files(patient_id, d / "bl_iph.nii.gz", d / "bl_ivh.nii.gz",
                             d / "fu_iph.nii.gz", d / "fu_ivh.nii.gz")
    return {"method": COPY_BASELINE, "patient_id": patient_id, "sample": 0,
            "expansion": bool(summary["expansion"]), **row}


# ---------------------------------------------------------------------------- aggregation
def patient_means(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric over a patient's samples (NaN samples skipped), one row per method × patient.

    Adds ``n_samples`` and ``n_{structure}_assd_undefined`` (samples whose ASSD is undefined by the
    empty-mask convention), so the table footnote can say how much was excluded.
    """
    required = {"method", "patient_id", "expansion"}
    missing = required - set(rows.columns)
    if missing:
        raise ValueError(f"sample rows lack column(s) {sorted(missing)}")
    metric_cols = [c for c in METRIC_COLUMNS if c in rows.columns]
    grouped = rows.groupby(["method", "patient_id"], sort=False)
    flags = grouped["expansion"].nunique()
    if (flags > 1).any():
        raise ValueError(f"patients with conflicting expansion labels: {sorted(flags[flags > 1].index.tolist())}")
    out = grouped[metric_cols].mean()  # pandas skips NaN: a patient mean uses its defined samples
    out["expansion"] = grouped["expansion"].first().astype(bool)
    out["n_samples"] = grouped.size()
    for s in ("iph", "total"):
        if f"{s}_assd" in rows.columns:
            out[f"n_{s}_assd_undefined"] = grouped[f"{s}_assd"].apply(lambda x: int(x.isna().sum()))
    return out.reset_index()


def method_order(methods: Iterable[str]) -> list[str]:
    """Baselines first (copy, nnU-Net 2D, 3D), then the other methods in order of first appearance."""
    seen = list(dict.fromkeys(methods))
    return [m for m in BASELINE_ORDER if m in seen] + [m for m in seen if m not in BASELINE_ORDER]


def mean_sd_cell(values: Sequence[float] | pd.Series) -> str:
    """``"12.91(12.8)"``: mean to 2 decimals, sample sd (ddof=1) to 1, as the paper prints them.

    NaN values are dropped; with one value the sd is undefined and printed as ``-``; with none the
    whole cell is ``-``.
    """
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return "-"
    sd = f"{np.std(arr, ddof=1):.1f}" if arr.size > 1 else "-"
    return f"{arr.mean():.2f}({sd})"


def table2(patients: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Paper-style Table 2 from :func:`patient_means` output.

    One row per (expansion group, method) that has patients; columns ``group``, ``method``,
    ``n_patients`` and ``IPH MAE (mL)`` … ``Total COV`` with ``mean(sd)`` strings over patients.
    """
    order = list(methods) if methods is not None else method_order(patients["method"])
    records = []
    for flag, label in GROUPS:
        for method in order:
            sub = patients[(patients["method"] == method) & (patients["expansion"] == flag)]
            if sub.empty:
                continue
            rec: dict[str, Any] = {"group": label, "method": method, "n_patients": int(sub["patient_id"].nunique())}
            for s, s_label in STRUCTURE_LABELS.items():
                for m in TABLE_METRICS:
                    rec[f"{s_label} {METRIC_LABELS[m]}"] = mean_sd_cell(sub[f"{s}_{m}"])
            records.append(rec)
    return pd.DataFrame(records)


def table2_footnote(patients: pd.DataFrame, n_samples: int | None = None) -> str:
    """Footnote stating what the cells are, the empty-mask convention and what was excluded."""
    parts = [
        "Cells: mean(sd) over patients of the per-patient mean over samples"
        + (f" (N={n_samples} samples per patient for HemExp variants;" if n_samples else " (")
        + " one prediction per patient for deterministic methods). MAE: absolute volume error (mL); "
        "ASSD: average symmetric surface distance (mm); COV: voxel recall of the generated mask against "
        "the follow-up reference; Total = IPH ∪ IVH. Groups by true follow-up expansion status "
        "(IPH growth >= 6 mL or >= 33 %).",
        EMPTY_MASK_CONVENTION,
    ]
    excluded = []
    for method in method_order(patients["method"]):
        sub = patients[patients["method"] == method]
        counts = {s: int(sub.get(f"n_{s}_assd_undefined", pd.Series(dtype=int)).sum()) for s in ("iph", "total")}
        if any(counts.values()):
            excluded.append(f"{method}: IPH {counts['iph']}, Total {counts['total']}")
    parts.append("Samples with undefined ASSD: " + ("; ".join(excluded) if excluded else "none") + ".")
    return " ".join(parts)


def write_table2(table: pd.DataFrame, csv_path: str | Path, md_path: str | Path, footnote: str = "") -> None:
    """Write Table 2 as CSV and as Markdown with the footnote below it (both atomic)."""
    write_csv(table, csv_path)
    with atomic_path(md_path) as tmp:
        tmp.write_text("# Table 2: follow-up synthesis by expansion status\n\n" + markdown_table(table)
                       + (f"\n{footnote}\n" if footnote else ""))


# ---------------------------------------------------------------------------- adherence
def adherence_table(samples: pd.DataFrame, by: Sequence[str] = ("method", "flag_source", "requested_flag")) -> pd.DataFrame:
    """Share of samples whose generated expansion state matches the requested flag.

    ``samples`` has one row per generated sample with ``patient_id``, ``requested_flag`` (0/1),
    ``baseline_iph_ml``, ``sample_iph_ml`` and the ``by`` columns (e.g. ``flag_source`` = oracle /
    classifier, or ``true_expansion`` to ask "how often was expansion simulated for true
    non-expanders"). The generated state uses the paper rule :func:`hemexp.core.clinical.is_expansion` on
    baseline vs sample IPH volume. Returns one row per group plus, when ``requested_flag`` is a key,
    an ``all`` row per remaining group: ``n_patients``, ``n_samples``, ``generated_expansion_rate``,
    ``match_rate``.
    """
    df = samples.copy()
    df["generated_expansion"] = [is_expansion(b, s) for b, s in zip(df["baseline_iph_ml"], df["sample_iph_ml"],
                                                                     strict=True)]
    df["requested_flag"] = df["requested_flag"].astype(int)
    df["match"] = df["generated_expansion"].astype(int) == df["requested_flag"]
    keys = list(by)
    parts = [_adherence_groups(df, keys)]
    if "requested_flag" in keys:
        rest = [k for k in keys if k != "requested_flag"]
        overall = _adherence_groups(df, rest) if rest else _adherence_groups(df.assign(_all=0), ["_all"]).drop(columns="_all")
        overall["requested_flag"] = "all"
        parts.append(overall)
    out = pd.concat(parts, ignore_index=True)
    if "requested_flag" in out:  # ints and "all" in one column: strings sort and print consistently
        out["requested_flag"] = out["requested_flag"].astype(str)
    return out.sort_values(keys, kind="stable").reset_index(drop=True)[[*keys, "n_patients", "n_samples",
                                                                         "generated_expansion_rate", "match_rate"]]


def _adherence_groups(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    g = df.groupby(keys, sort=True)
    return pd.DataFrame({
        "n_patients": g["patient_id"].nunique(),
        "n_samples": g.size(),
        "generated_expansion_rate": g["generated_expansion"].mean(),
        "match_rate": g["match"].mean(),
    }).reset_index()


# ---------------------------------------------------------------------------- MLflow
def variant_metrics(patients: pd.DataFrame, method: str, prefix: str = "eval") -> dict[str, float]:
    """Flat MLflow metrics of one method: mean and sd over patients per group, structure and metric.

    Keys look like ``eval.expansion.iph_mae_mean``; groups are ``expansion``, ``non_expansion`` and
    ``all``. Undefined values (e.g. an empty group) are left out rather than logged as NaN.
    """
    sub = patients[patients["method"] == method]
    groups = {"expansion": sub[sub["expansion"]], "non_expansion": sub[~sub["expansion"]], "all": sub}
    out: dict[str, float] = {}
    for gname, gdf in groups.items():
        if gdf.empty:
            continue
        out[f"{prefix}.{gname}.n_patients"] = float(len(gdf))
        for col in METRIC_COLUMNS:
            if col not in gdf:
                continue
            values = gdf[col].dropna()
            if len(values):
                out[f"{prefix}.{gname}.{col}_mean"] = float(values.mean())
            if len(values) > 1:
                out[f"{prefix}.{gname}.{col}_sd"] = float(values.std(ddof=1))
    return out


def log_variant_results(cfg: dict[str, Any], variant: str, metrics: dict[str, float],
                        artifacts: Sequence[str | Path] = (), artifact_path: str = "evaluation") -> None:
    """Log a diffusion variant's evaluation numbers into the MLflow run of that trained model.

    The run is found through ``results/models/diffusion/{variant}/mlflow_run_id.txt`` (written when
    the model was trained), so evaluation and training compare side by side in the MLflow UI.
    """

    run_dir = Layout.of(cfg).diffusion_dir(variant)
    if not (run_dir / RUN_ID_FILE).exists():
        raise FileNotFoundError(f"no MLflow run recorded for diffusion variant {variant!r} ({run_dir / RUN_ID_FILE})")
    log_to_model_run(cfg, run_dir, metrics, artifacts=list(artifacts), artifact_path=artifact_path)
