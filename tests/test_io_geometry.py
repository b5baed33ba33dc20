"""io: the one voxel-spacing, mask reader and same-grid check that every stage uses.

Each replaced per-stage copy is written out below as ``_old_*`` (verbatim formula) so the tests show
the survivor agrees with it on the cases that matter, and where it deliberately differs.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hemexp.core.errors import PatientInputError
from hemexp.io.masks import binarise_mask, read_mask
from hemexp.io.nifti import affine_spacing_mm, grid_mismatch, spacing_mm

OBLIQUE = np.array([[-0.78, 0.12, 0.0, 101.3], [0.1, 0.81, 0.3, -84.25], [0.0, -0.2, 4.9, -33.7], [0, 0, 0, 1.0]])


def _old_sqrt_spacing(affine: np.ndarray) -> tuple[float, ...]:  # evaluation/table2.py, cohort/table1.py
    return tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def _old_norm_spacing(affine: np.ndarray) -> tuple[float, ...]:  # collect.py, guidance/run.py, simulate.py, grid.py
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _old_allclose_same_grid(shape, affine, ref_shape, ref_affine) -> bool:  # nnunet/dataset.py, table2.py
    return tuple(shape) == tuple(ref_shape) and np.allclose(affine, ref_affine, atol=1e-3)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = OBLIQUE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.0, 3.0, 1.0]), OBLIQUE, np.diag([-0.5, 0.9, 5.0, 1.0])])
def test_affine_spacing_matches_every_old_formula(affine):
    new = affine_spacing_mm(affine)
    assert isinstance(new, tuple) and all(isinstance(v, float) for v in new)
    assert new == _old_sqrt_spacing(affine) == _old_norm_spacing(affine)  # bit for bit: outputs unchanged
    assert spacing_mm(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), affine)) == new


def test_read_mask_returns_binary_uint8_and_affine_like_the_old_readers(tmp_path):
    data = np.zeros((6, 5, 4), np.uint8)
    data[1:3, 1:4, 2] = 1
    path = _save(tmp_path / "iph.nii.gz", data)
    mask, affine = read_mask(path, "P1")
    assert mask.dtype == np.uint8 and mask.shape == data.shape
    np.testing.assert_array_equal(mask > 0, np.asarray(nib.load(path).dataobj) > 0.5)  # old table2/collect reader
    np.testing.assert_allclose(affine, nib.load(path).affine)
    _save(tmp_path / "4d.nii.gz", data[..., None])  # trailing singleton axis: still one 3D mask
    assert read_mask(tmp_path / "4d.nii.gz", "P1")[0].shape == data.shape


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d * 3, "not binary"),
        (lambda d: d * 255, "not binary"),  # a site export format, never a pipeline product
        (lambda d: d.astype(np.float32) * 0.5, "not binary"),
        (lambda d: np.stack([d, d], axis=-1), "3D"),
    ],
    ids=["value-3", "value-255", "fraction", "4d"],
)
def test_read_mask_rejects_non_binary_products_naming_patient_and_file(tmp_path, make, problem):
    data = np.zeros((6, 5, 4), np.uint8)
    data[2, 2, 2] = 1
    path = _save(tmp_path / "m.nii.gz", make(data))
    with pytest.raises(PatientInputError, match=problem) as err:
        read_mask(path, "P7", what="follow-up IPH mask")
    assert err.value.patient_id == "P7" and err.value.file == str(path)


def test_read_mask_missing_and_corrupt_files(tmp_path):
    with pytest.raises(PatientInputError, match="not found") as err:
        read_mask(tmp_path / "none.nii.gz", "P2")
    assert err.value.patient_id == "P2"
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(PatientInputError, match="cannot read"):
        read_mask(tmp_path / "bad.nii.gz", "P2")


def test_read_mask_site_formats_follow_binarise_mask(tmp_path):
    """With ``labels`` (raw site exports: {0,1}, {0,255}, label maps) it is the old load_mask_nifti."""
    labels = {"iph": 1, "ivh": 2}
    label_map = np.zeros((6, 5, 4), np.uint8)
    label_map[1, 1, 1], label_map[2, 2, 2] = 1, 2
    path = _save(tmp_path / "lab.nii.gz", label_map)
    for which in ("iph", "ivh"):
        mask, _ = read_mask(path, "P3", which=which, labels=labels, label_map=True)
        np.testing.assert_array_equal(mask, binarise_mask(label_map, which, labels, True))
    mask, _ = read_mask(_save(tmp_path / "b255.nii.gz", (label_map > 0).astype(np.uint8) * 255), "P3",
                        which="iph", labels=labels)
    np.testing.assert_array_equal(mask, label_map > 0)
    with pytest.raises(PatientInputError, match="IVH mask: label map has values"):
        read_mask(_save(tmp_path / "l7.nii.gz", label_map * 7), "P3", what="IVH mask", which="ivh", labels=labels,
                  label_map=True)


def test_grid_check_accepts_float32_round_trip_and_rejects_real_mismatches(tmp_path):
    shape = (6, 5, 4)
    path = _save(tmp_path / "a.nii.gz", np.zeros(shape, np.uint8))  # nibabel stores the sform in float32
    stored = nib.load(path).affine
    assert not np.array_equal(stored, OBLIQUE)  # the round trip did move the entries ...
    assert grid_mismatch(shape, stored, shape, OBLIQUE) is None  # ... and both checks accept it
    assert _old_allclose_same_grid(shape, stored, shape, OBLIQUE)
    bad = {
        "shape": ((6, 5, 3), OBLIQUE),
        "spacing": (shape, OBLIQUE @ np.diag([1.0, 1.0, 2.0, 1.0])),
        "half-voxel shift": (shape, OBLIQUE + np.array([[0, 0, 0, 0.4]] + [[0, 0, 0, 0]] * 3)),
    }
    for name, (s, a) in bad.items():
        problem = grid_mismatch(s, a, shape, OBLIQUE)
        assert problem is not None and "does not match" in problem, name
        assert not _old_allclose_same_grid(s, a, shape, OBLIQUE), name  # old and new agree here
    # Deliberate difference: a 0.01 mm origin offset (1/80 of the smallest voxel) was a "different grid"
    # for the old atol=1e-3 checks; it is float noise from another writer, not a different grid.
    nudged = OBLIQUE + np.array([[0, 0, 0, 0.01]] + [[0, 0, 0, 0]] * 3)
    assert grid_mismatch(shape, nudged, shape, OBLIQUE) is None


def test_grid_mismatch_names_both_grids():
    msg = grid_mismatch((6, 5, 4), np.diag([1.0, 1.0, 2.0, 1.0]), (6, 5, 3), np.diag([1.0, 1.0, 3.0, 1.0]),
                        what="prediction", ref_what="model")
    assert msg.startswith("prediction grid (6, 5, 4) at 1x1x2 mm does not match model grid (6, 5, 3) at 1x1x3 mm")
