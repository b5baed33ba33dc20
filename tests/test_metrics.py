"""Segmentation metrics on shapes with known answers, and the documented empty-mask convention."""

import math

import numpy as np
import pytest
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

from hemexp.evaluation.metrics import (
    absolute_volume_error_ml,
    assd_mm,
    coverage,
    dice,
    hemorrhage_metrics,
    structure_metrics,
    volume_ml,
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
    assert volume_ml(ref, spacing) == pytest.approx(216 * 0.5 / 1000)
    assert absolute_volume_error_ml(pred, ref, spacing) == pytest.approx(108 * 0.5 / 1000)
    # recall is asymmetric: the superset covers the subset completely
    assert coverage(ref, pred) == 1.0


def test_empty_prediction_convention():
    ref = ball((16, 16, 16), (8, 8, 8), 4)
    empty = np.zeros_like(ref)
    m = structure_metrics(empty, ref, (1.0, 1.0, 1.0))
    assert m["cov"] == 0.0 and m["dice"] == 0.0
    assert math.isnan(m["assd"])
    assert m["mae"] == pytest.approx(volume_ml(ref, (1, 1, 1)))


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
