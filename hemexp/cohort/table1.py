"""The cohort table (the paper's Table 1): median [IQR] or % per split.

Volumes and expansion status come from the masks themselves (not from manifest columns), so the
table describes the data the models will actually see.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from hemexp.core.clinical import is_expansion, mask_volume_ml
from hemexp.core.tables import markdown_table
from hemexp.io.masks import read_mask
from hemexp.io.nifti import affine_spacing_mm

DEFAULT_LABELS = {"iph": 1, "ivh": 2}


def ct_slice_thickness_mm(path: str | Path) -> float:
    """Slice thickness of a CT: NIfTI z voxel size, or the DICOM SliceThickness of a series folder."""
    path = Path(path)
    if path.is_dir():
        import pydicom

        for f in sorted(path.iterdir()):
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            if "SliceThickness" in ds:
                return float(ds.SliceThickness)
        return float("nan")
    return float(nib.load(str(path)).header.get_zooms()[2])


def patient_volumes(row: pd.Series, labels: dict[str, int]) -> dict[str, float]:
    """Baseline/follow-up IPH and IVH volumes (mL) of one manifest row."""
    out = {}
    for time in ("baseline", "followup"):
        label_map = row[f"{time}_iph"] == row[f"{time}_ivh"]
        for which in ("iph", "ivh"):
            mask, affine = read_mask(row[f"{time}_{which}"], str(row["patient_id"]), f"{time} {which.upper()} mask",
                                     which=which, labels=labels, label_map=label_map)
            out[f"{time}_{which}_ml"] = mask_volume_ml(mask, affine_spacing_mm(affine))
    return out


def cohort_frame(manifest: pd.DataFrame, labels: dict[str, int] | None = None) -> pd.DataFrame:
    """One row per patient with clinical variables, measured volumes, IVH presence and HE label."""
    labels = labels or DEFAULT_LABELS
    rows = []
    for _, row in manifest.iterrows():
        vols = patient_volumes(row, labels)
        rows.append({
            **row.to_dict(), **vols,
            "ivh_present": vols["baseline_ivh_ml"] > 0,
            "he": is_expansion(vols["baseline_iph_ml"], vols["followup_iph_ml"]),
            "slice_thickness_mm": ct_slice_thickness_mm(row["baseline_ct"]),
        })
    return pd.DataFrame(rows)


CONTINUOUS = [("Age (years)", "age"), ("GCS", "gcs"), ("Systolic BP (mmHg)", "sbp"),
              ("Onset-to-CT (h)", "onset_to_ct_h")]
BINARY = [("Anticoagulant use (%)", "anticoagulant"), ("Antiplatelet use (%)", "antiplatelet")]
AFTER = [("Baseline IPH (mL)", "baseline_iph_ml", "cont"), ("IVH present (%)", "ivh_present", "bin"),
         ("HE prevalence (%)", "he", "bin"), ("Slice thickness (mm)", "slice_thickness_mm", "cont")]


def _median_iqr(values: pd.Series) -> str:
    q1, med, q3 = np.nanpercentile(values.astype(float), [25, 50, 75])
    return f"{med:.1f} [{q1:.1f}, {q3:.1f}]"


def _percent(values: pd.Series) -> str:
    return f"{100.0 * values.astype(float).mean():.1f}%"


def table1(frame: pd.DataFrame) -> pd.DataFrame:
    """Characteristic x split table; column headers name the sites and n, like the paper's."""
    rows = [(name, col, "cont") for name, col in CONTINUOUS] + [(n, c, "bin") for n, c in BINARY] + AFTER
    columns = {}
    for split in ("train", "test"):
        part = frame[frame["split"] == split]
        if part.empty:
            continue
        sites = ",".join(sorted(part["site"].unique()))
        header = f"{split.capitalize()} ({sites}, n={len(part)})"
        columns[header] = [_median_iqr(part[c]) if kind == "cont" else _percent(part[c]) for _, c, kind in rows]
    return pd.DataFrame(columns, index=pd.Index([r[0] for r in rows], name="Characteristic"))


def to_markdown(table: pd.DataFrame) -> str:
    """Table 1 as a pipe table, characteristics (the index) as the first column."""
    return markdown_table(table, index=True)
