"""Segmentation metrics on shapes with known answers, and the documented empty-mask convention."""

import math

import numpy as np
import pytest
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

from hemexp.core.clinical import dice, mask_volume_ml
from hemexp.evaluation.metrics import (
    absolute_volume_error_ml,
    assd_mm,
    coverage,
    hemorrhage_metrics,
    structure_metrics,
)


def ball(shape, centre_mm, radius_mm, spacing=(1.0, 1.0, 1.0)):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm, strict=True)) <= radius_mm**2


def shifted_sphere_assd(radius: float, shift: float) -> float:
    """Continuous ASSD of a sphere vs the same sphere shifted by ``shift``: mean over the surface of
    | |p - c'| - R |; both directions are equal by symmetry. Small-shift limit: shift / 2."""
    u = np.linspace(-1.0, 1.0, 200_001)  # cos(angle to the shift axis), uniform on the sphere
    return float(np.mean(np.abs(np.sqrt(radius**2 - 2 * radius * shift * u + shift**2) - radius)))


def brute_force_assd(a, b, spacing):
    """Independent reference: surface = voxels removed by one erosion, nearest-neighbour in mm."""
    sp = np.asarray(spacing)
    ea = np.argwhere(a ^ binary_erosion(a)) * sp
    eb = np.argwhere(b ^ binary_erosion(b)) * sp
    return float(np.concatenate([cKDTree(eb).query(ea)[0], cKDTree(ea).query(eb)[0]]).mean())


@pytest.mark.parametrize("shift", [2, 3])
def test_assd_sphere_vs_shifted_sphere_matches_continuous_value(shift):
    a = ball((40, 40, 40), (20, 20, 20), 12)
    b = np.roll(a, shift, axis=0)
    expected = shifted_sphere_assd(12, shift)  # ~ shift / 2
    assert assd_mm(a, b, (1.0, 1.0, 1.0)) == pytest.approx(expected, rel=0.1)
    assert assd_mm(a, a, (1.0, 1.0, 1.0)) == 0.0


def test_assd_anisotropic_spacing_is_in_mm():
    spacing = (1.0, 1.0, 2.5)
    a = ball((40, 40, 24), (20, 20, 30), 12, spacing)
    b = np.roll(a, 2, axis=2)  # 2 slices = 5 mm
    value = assd_mm(a, b, spacing)
    assert value == pytest.approx(brute_force_assd(a, b, spacing), rel=1e-5)
    assert value == pytest.approx(shifted_sphere_assd(12, 5.0), rel=0.15)
    # the same voxels read with isotropic 1 mm spacing give a clearly smaller distance
    assert assd_mm(a, b, (1.0, 1.0, 1.0)) < 0.6 * value


def test_assd_matches_brute_force_on_irregular_masks():
    rng = np.random.default_rng(0)
    a = rng.random((20, 18, 10)) > 0.7
    b = rng.random((20, 18, 10)) > 0.6
    spacing = (0.7, 0.9, 3.0)
    assert assd_mm(a, b, spacing) == pytest.approx(brute_force_assd(a, b, spacing), rel=1e-5)


def test_coverage_dice_and_volume_of_a_subset():
    ref = np.zeros((10, 10, 10), bool)
    ref[2:8, 2:8, 2:8] = True  # 216 voxels
    pred = np.zeros_like(ref)
    pred[2:8, 2:8, 2:5] = True  # 108 voxels, all inside ref
    assert coverage(pred, ref) == pytest.approx(108 / 216)
    assert dice(pred, ref) == pytest.approx(2 * 108 / (108 + 216))
    spacing = (0.5, 0.5, 2.0)  # 0.5 mm^3 per voxel
    assert mask_volume_ml(ref, spacing) == pytest.approx(216 * 0.5 / 1000)
    assert absolute_volume_error_ml(pred, ref, spacing) == pytest.approx(108 * 0.5 / 1000)
    # recall is asymmetric: the superset covers the subset completely
    assert coverage(ref, pred) == 1.0


def test_empty_prediction_convention():
    ref = ball((16, 16, 16), (8, 8, 8), 4)
    empty = np.zeros_like(ref)
    m = structure_metrics(empty, ref, (1.0, 1.0, 1.0))
    assert m["cov"] == 0.0 and m["dice"] == 0.0
    assert math.isnan(m["assd"])
    assert m["mae"] == pytest.approx(mask_volume_ml(ref, (1, 1, 1)))


def test_empty_reference_convention():
    pred = ball((16, 16, 16), (8, 8, 8), 4)
    empty = np.zeros_like(pred)
    m = structure_metrics(pred, empty, (1.0, 1.0, 1.0))
    assert math.isnan(m["cov"]) and math.isnan(m["assd"])
    assert m["dice"] == 0.0 and m["mae"] > 0


def test_both_empty_is_a_perfect_prediction():
    empty = np.zeros((8, 8, 8), np.uint8)
    m = structure_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert m == {"mae": 0.0, "assd": 0.0, "cov": 1.0, "dice": 1.0, "pred_ml": 0.0, "ref_ml": 0.0}


def test_total_is_union_of_iph_and_ivh():
    shape = (12, 12, 12)
    ref_iph = np.zeros(shape, np.uint8)
    ref_iph[2:6, 2:6, 2:6] = 1  # 64
    ref_ivh = np.zeros(shape, np.uint8)
    ref_ivh[7:9, 7:9, 7:9] = 1  # 8
    pred_iph = ref_iph.copy()
    pred_ivh = np.zeros(shape, np.uint8)  # IVH missed
    m = hemorrhage_metrics(pred_iph, pred_ivh, ref_iph, ref_ivh, (1.0, 1.0, 1.0))
    assert m["iph_cov"] == 1.0 and m["iph_mae"] == 0.0 and m["iph_assd"] == 0.0
    assert m["total_cov"] == pytest.approx(64 / 72)
    assert m["total_mae"] == pytest.approx(8 / 1000)
    assert m["total_assd"] > 0


def test_shape_and_spacing_mismatch_raise():
    with pytest.raises(ValueError, match="shape"):
        structure_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        structure_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1))


# ---------------------------------------------------------------------------- one Dice, one volume
def _old_evaluation_dice(pred, ref):  # evaluation/metrics.py::dice before the merge
    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    denom = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    return 1.0 if denom == 0 else 2.0 * float(np.count_nonzero(p & r)) / denom


def _old_preprocess_dice(a, b):  # preprocess/pipeline.py::dice (registration brain-Dice QC) before the merge
    a, b = a > 0, b > 0
    denom = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / denom) if denom else 1.0


def _old_volume_ml(mask, spacing_mm):  # evaluation/metrics.py::volume_ml before the merge
    return float(np.count_nonzero(mask)) * float(np.prod(spacing_mm)) / 1000.0


def _mask_pairs():
    rng = np.random.default_rng(3)
    a = rng.random((12, 10, 6)) > 0.6
    b = rng.random((12, 10, 6)) > 0.5
    empty = np.zeros_like(a)
    return {"random": (a, b), "uint8": (a.astype(np.uint8), b.astype(np.uint8)), "identical": (a, a),
            "disjoint": (a, ~a), "pred-empty": (empty, b), "ref-empty": (a, empty), "both-empty": (empty, empty),
            "labels": (a * 2, b.astype(np.float32))}


@pytest.mark.parametrize("case", list(_mask_pairs()))
def test_one_dice_agrees_with_both_old_implementations(case):
    """Both old copies agreed everywhere, both-empty included (Dice 1); the survivor keeps that."""
    p, r = _mask_pairs()[case]
    assert dice(p, r) == _old_evaluation_dice(p, r) == _old_preprocess_dice(np.asarray(p), np.asarray(r))
    assert structure_metrics(p, r, (1.0, 1.0, 2.0))["dice"] == dice(p, r)  # evaluation uses the same one


def test_dice_empty_mask_convention_and_shape_check():
    empty = np.zeros((4, 4, 4), bool)
    one = empty.copy()
    one[1, 1, 1] = True
    assert dice(empty, empty) == 1.0  # nothing to find and nothing found: a perfect answer
    assert dice(one, empty) == dice(empty, one) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(one, one[:3])


@pytest.mark.parametrize("case", list(_mask_pairs()))
def test_one_volume_agrees_with_the_old_evaluation_volume(case):
    for m in _mask_pairs()[case]:
        assert mask_volume_ml(m, (0.5, 0.7, 3.0)) == _old_volume_ml(m, (0.5, 0.7, 3.0))
