"""Segmentation metrics of a generated follow-up against the follow-up reference (paper Table 2).

Metrics, per structure (IPH, and total hemorrhage = IPH ∪ IVH):

* ``mae``  — absolute volume error |V_pred − V_ref| in mL (voxel count × voxel volume from the spacing).
  Averaged over patients it is the paper's "MAE".
* ``assd`` — average symmetric surface distance in mm, computed by MONAI
  (:func:`monai.metrics.compute_average_surface_distance` with ``symmetric=True`` and the voxel
  ``spacing``): the mean over the surface voxels of *both* masks of the distance to the other mask's
  surface.
* ``cov``  — hematoma coverage: voxel recall |P ∩ R| / |R| of the generated mask P against the
  reference R (the paper's "COV").
* ``dice`` — 2|P ∩ R| / (|P| + |R|), reported for completeness.

Volume and Dice are :func:`hemexp.core.clinical.mask_volume_ml` and :func:`hemexp.core.clinical.dice`,
the definitions every stage shares (the sampler's volumes, the preprocess QC).

Empty-mask convention (:data:`EMPTY_MASK_CONVENTION`, also printed under Table 2):

====================  =====  =====  =====  ===========
case                   MAE    COV    Dice   ASSD
====================  =====  =====  =====  ===========
both empty             0      1      1      0
reference empty only   V_p    NaN    0      NaN
prediction empty only  V_r    0      0      NaN
====================  =====  =====  =====  ===========

Why: an empty prediction of an empty reference is exactly right, so it scores perfectly rather than
disappearing from the means. Recall has no denominator when the reference is empty, so COV is
undefined there (its false-positive volume is still charged by MAE and Dice). A surface distance
needs two surfaces: any finite "penalty distance" (image diagonal, as some challenges use) would
dominate a mean of ~2 mm values and depend on the crop size, so ASSD is NaN, excluded from the
means, and the number of excluded values is reported next to the table. An empty prediction is never
rewarded: its COV is 0, its Dice 0 and its MAE the full reference volume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from hemexp.core.clinical import dice, mask_volume_ml

STRUCTURES = ("iph", "total")
METRICS = ("mae", "assd", "cov", "dice")

EMPTY_MASK_CONVENTION = (
    "Empty masks: both empty -> MAE 0, COV 1, Dice 1, ASSD 0; reference empty but prediction not -> "
    "COV and ASSD undefined (excluded from means), Dice 0; prediction empty but reference not -> "
    "COV 0, Dice 0, ASSD undefined (excluded from means; count reported)."
)


def _as_bool(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != bool:
        arr = arr > 0
    return arr


def _check_pair(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing_mm) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} has {len(spacing_mm)} entries for a {pred.ndim}-D mask")
    if any(not (s > 0 and math.isfinite(s)) for s in spacing_mm):
        raise ValueError(f"spacing must be positive and finite, got {tuple(spacing_mm)}")


def absolute_volume_error_ml(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """|V_pred − V_ref| in mL."""
    _check_pair(np.asarray(pred), np.asarray(ref), spacing_mm)
    return abs(mask_volume_ml(pred, spacing_mm) - mask_volume_ml(ref, spacing_mm))


def coverage(pred: np.ndarray, ref: np.ndarray) -> float:
    """Voxel recall |P ∩ R| / |R|; 1 when both are empty, NaN when only the reference is empty."""
    p, r = _as_bool(pred), _as_bool(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    n_ref = int(np.count_nonzero(r))
    if n_ref == 0:
        return 1.0 if not p.any() else float("nan")
    return float(np.count_nonzero(p & r)) / n_ref


def assd_mm(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (MONAI); 0 when both empty, NaN when exactly one is.

    MONAI extracts each mask's surface as the voxels removed by one binary erosion, takes Euclidean
    distance transforms scaled by ``spacing_mm`` and averages the pooled pred→ref and ref→pred
    distances. Only the empty cases are handled here (MONAI would return inf/NaN with a warning).
    """
    from monai.metrics import compute_average_surface_distance

    p, r = _as_bool(pred), _as_bool(ref)
    _check_pair(p, r, spacing_mm)
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return 0.0
    if not (p_any and r_any):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about channel layout conventions here
        value = compute_average_surface_distance(
            p[None, None], r[None, None], include_background=True, symmetric=True,
            spacing=[float(s) for s in spacing_mm],
        )
    return float(np.asarray(value).reshape(-1)[0])


def structure_metrics(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> dict[str, float]:
    """``{"mae", "assd", "cov", "dice"}`` of one structure, plus the two volumes (mL)."""
    p, r = _as_bool(pred), _as_bool(ref)
    _check_pair(p, r, spacing_mm)
    return {
        "mae": absolute_volume_error_ml(p, r, spacing_mm),
        "assd": assd_mm(p, r, spacing_mm),
        "cov": coverage(p, r),
        "dice": dice(p, r),
        "pred_ml": mask_volume_ml(p, spacing_mm),
        "ref_ml": mask_volume_ml(r, spacing_mm),
    }


def hemorrhage_metrics(pred_iph: np.ndarray, pred_ivh: np.ndarray, ref_iph: np.ndarray, ref_ivh: np.ndarray,
                       spacing_mm: Sequence[float]) -> dict[str, float]:
    """Metrics for IPH and for total hemorrhage (IPH ∪ IVH), flat keys ``iph_mae`` … ``total_ref_ml``."""
    out: dict[str, float] = {}
    pairs = {
        "iph": (_as_bool(pred_iph), _as_bool(ref_iph)),
        "total": (_as_bool(pred_iph) | _as_bool(pred_ivh), _as_bool(ref_iph) | _as_bool(ref_ivh)),
    }
    for name, (p, r) in pairs.items():
        for key, value in structure_metrics(p, r, spacing_mm).items():
            out[f"{name}_{key}"] = value
    return out
