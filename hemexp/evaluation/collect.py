"""Where the evaluation's inputs are: sample passes, their volumes and masks, references and baselines."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hemexp.baselines.nnunet.dataset import baseline_methods
from hemexp.core.clinical import mask_volume_ml
from hemexp.core.config import sampled_variants, variants
from hemexp.core.errors import PatientInputError
from hemexp.core.layout import SAMPLE_MASK, Layout
from hemexp.core.runtime import get_logger
from hemexp.evaluation.table2 import (
    copy_baseline_row,
    metrics_from_files,
)
from hemexp.io.masks import read_mask
from hemexp.io.nifti import affine_spacing_mm
from hemexp.preprocess.pipeline import read_summary
from hemexp.sampling.flags import flag_source_passes

log = get_logger(__name__)

VOLUME_COLUMNS = ("sample", "flag", "flag_source", "iph_ml", "ivh_ml", "total_ml", "baseline_iph_ml")


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


def sample_passes(cfg: Mapping[str, Any]) -> list[SamplePass]:
    """The main pass of every sampled variant, then the extra flag-source passes."""
    known = variants(cfg)
    main = str(cfg["sampling"]["flag_source"])
    out = [SamplePass(v, v, Layout.of(cfg).samples_root(None) / v, main, known[v].uses_flag) for v in sampled_variants(cfg)]
    for source, names in flag_source_passes(cfg).items():
        out += [SamplePass(f"{v} ({source} flag)", v, Layout.of(cfg).samples_root(source) / v, source, True) for v in names]
    return out


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
    summary = read_summary(patient_id, pre_dir)
    vols = {}
    for s in ("iph", "ivh"):
        mask, affine = read_mask(pre_dir / f"fu_{s}.nii.gz", patient_id, f"follow-up {s.upper()} mask")
        vols[s] = mask_volume_ml(mask, affine_spacing_mm(affine))
    return {"expansion": bool(summary["expansion"]), "truth_iph_ml": vols["iph"],
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
    for name, method in baseline_methods(cfg).items():
        folder = Layout.of(cfg).baseline_masks(name, patient_id)
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
        pre_dir = Layout.of(cfg).preprocessed(pid)
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
