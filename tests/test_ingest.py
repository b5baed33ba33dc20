"""Ingest of NIfTI CTs and masks: canonical orientation, DICOM/NIfTI equivalence, bad inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_dicom_series import AXIAL, write_series

from hemexp.core.errors import PatientInputError
from hemexp.io.ingest import load_ct, load_mask
from hemexp.io.nifti import save_nifti

LABELS = {"iph": 1, "ivh": 2}


def phantom_hu(shape=(40, 48, 20), seed: int = 0) -> np.ndarray:
    """Integer HU volume: air around a 'head' with tissue noise and a bright lesion."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[5:-5, 6:-6, 2:-2] = rng.integers(10, 50, size=(shape[0] - 10, shape[1] - 12, shape[2] - 4))
    hu[12:18, 20:30, 8:12] = 75.0
    return hu


def las_affine(shape, spacing=(0.8, 0.9, 2.5), origin=(30.0, -40.0, -20.0)) -> np.ndarray:
    """An LPS-ordered array (x runs right->left, y anterior->posterior), as DICOM-derived NIfTIs often are."""
    return np.array([[-spacing[0], 0, 0, origin[0]], [0, -spacing[1], 0, origin[1]],
                     [0, 0, spacing[2], origin[2]], [0, 0, 0, 1.0]])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=None, descrip: bytes = b"") -> Path:
    img = nib.Nifti1Image(data if dtype is None else data.astype(dtype), affine)
    img.header["descrip"] = descrip
    nib.save(img, str(path))
    return path


def test_nifti_ct_is_canonical_float32_hu(tmp_path: Path) -> None:
    hu = phantom_hu()
    affine = las_affine(hu.shape)
    path = write_nifti(tmp_path / "ct.nii.gz", hu, affine, dtype=np.int16)
    img = load_ct(path, "P01")
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.get_fdata(), hu[::-1, ::-1, :])
    # Same world position for a voxel before and after canonicalisation.
    i, j, k = 13, 22, 9
    before = nib.affines.apply_affine(affine, (i, j, k))
    after = nib.affines.apply_affine(img.affine, (hu.shape[0] - 1 - i, hu.shape[1] - 1 - j, k))
    np.testing.assert_allclose(before, after, atol=1e-6)
    assert img.extra["ingest"]["format"] == "nifti" and img.extra["source_path"] == str(path)


def test_padding_below_air_is_clipped(tmp_path: Path) -> None:
    hu = phantom_hu()
    hu[:3] = -3024.0
    img = load_ct(write_nifti(tmp_path / "ct.nii", hu, np.eye(4)), "P01")
    assert img.get_fdata().min() == -1024.0


def test_dicom_and_nifti_of_same_volume_agree(tmp_path: Path) -> None:
    """A series written as DICOM and as NIfTI (with the equivalent affine) ingest identically."""
    hu = phantom_hu()  # indexed (column, row, slice)
    ipp0, spacing, dz = np.array([-20.0, -30.0, 15.0]), (0.9, 0.8), 2.5  # (row spacing, column spacing)
    positions = [ipp0 + [0, 0, dz * k] for k in range(hu.shape[2])]
    write_series(tmp_path / "dcm", hu.transpose(2, 1, 0), positions, iop=AXIAL, spacing=spacing)
    affine = np.array([[-spacing[1], 0, 0, -ipp0[0]], [0, -spacing[0], 0, -ipp0[1]],
                       [0, 0, dz, ipp0[2]], [0, 0, 0, 1.0]])  # LPS->RAS of the DICOM geometry
    from_dicom = load_ct(tmp_path / "dcm", "P01")
    from_nifti = load_ct(write_nifti(tmp_path / "ct.nii.gz", hu, affine, dtype=np.int16), "P01")
    np.testing.assert_array_equal(from_dicom.get_fdata(), from_nifti.get_fdata())
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-5)


def test_synthetic_cohort_dicom_writer_round_trip(tmp_path: Path) -> None:
    """The cohort simulator's DICOM writer and this reader agree on geometry and HU conventions."""
    writer = pytest.importorskip("hemexp.cohort.synth.dicom_writer")
    hu = phantom_hu()
    affine = las_affine(hu.shape)
    writer.write_dicom_series(hu, affine, tmp_path / "dcm", "P01", "HEAD", rescale_intercept=-1024.0)
    from_dicom = load_ct(tmp_path / "dcm", "P01")
    from_nifti = load_ct(write_nifti(tmp_path / "ct.nii.gz", hu, affine), "P01")
    np.testing.assert_array_equal(from_dicom.get_fdata(), from_nifti.get_fdata())
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: None, "CT not found"),
        (lambda p: write_nifti(p, np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), "NaN/inf voxels"),
        (lambda p: _truncate(write_nifti(p, phantom_hu(), np.eye(4))), "truncated or corrupt"),
        (lambda p: p.write_bytes(b"this is not a nifti file at all" * 20), "truncated or corrupt"),
        (lambda p: write_nifti(p, np.random.default_rng(0).uniform(0, 900, (8, 8, 4)), np.eye(4)),
         "not a CT in Hounsfield units"),
        (lambda p: write_nifti(p, np.zeros((8, 8, 4, 3)), np.eye(4)), "must be a 3D volume"),
    ],
    ids=["missing", "nan", "truncated", "garbage", "mr-like", "4d"],
)
def test_bad_nifti_ct_raises_patient_input_error(tmp_path: Path, make, problem: str) -> None:
    path = tmp_path / "ct.nii.gz"
    make(path)
    with pytest.raises(PatientInputError) as err:
        load_ct(path, "P09")
    msg = str(err.value)
    assert "patient P09" in msg and str(path) in msg and problem in msg, msg


def test_other_file_types_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ct.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(PatientInputError, match="DICOM folder or a .nii"):
        load_ct(path, "P09")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def ct_and_path(tmp_path: Path):
    hu = phantom_hu()
    path = write_nifti(tmp_path / "ct.nii.gz", hu, las_affine(hu.shape))
    return load_ct(path, "P01"), path, hu


@pytest.mark.parametrize("encoding", ["01", "0255", "labelmap"])
def test_mask_encodings_become_canonical_uint8(tmp_path: Path, ct_and_path, encoding: str) -> None:
    ct, _, hu = ct_and_path
    iph, ivh = hu == 75.0, np.zeros(hu.shape, bool)
    ivh[20:24, 20:24, 5:8] = True
    values = {"01": iph * 1, "0255": iph * 255, "labelmap": iph * 1 + ivh * 2}[encoding]
    # Mask stored in a different orientation (RAS) from the CT file (LPS order): same grid in the world.
    ras = nib.as_closest_canonical(nib.Nifti1Image(values.astype(np.uint8), las_affine(hu.shape)))
    path = write_nifti(tmp_path / "iph.nii.gz", np.asarray(ras.dataobj), ras.affine)
    for which, truth in (("iph", iph), ("ivh", ivh)):
        if which == "ivh" and encoding != "labelmap":
            continue
        mask = load_mask(path, ct, which, LABELS, encoding == "labelmap", "P01")
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(mask.get_fdata())) <= {0.0, 1.0}
        np.testing.assert_array_equal(mask.get_fdata() > 0, truth[::-1, ::-1, :])
        np.testing.assert_array_equal(mask.affine, ct.affine)


def test_mask_with_tiny_float_rounding_is_accepted(tmp_path: Path, ct_and_path) -> None:
    ct, _, hu = ct_and_path
    affine = las_affine(hu.shape)
    affine[:3, 3] += 2e-5
    path = write_nifti(tmp_path / "m.nii.gz", (hu == 75).astype(np.uint8), affine)
    assert load_mask(path, ct, "iph", LABELS, False, "P01").get_fdata().sum() == (hu == 75).sum()


# A mask on another grid of the CT's physical space is resampled (tests/test_masks_any_grid.py); one whose
# lesion lies outside the CT's field of view (here 100 mm to the side) is rejected, naming both grids.
_AWAY = np.array([[0, 0, 0, 100.0]] * 3 + [[0, 0, 0, 0]])


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda hu, a: (hu[:, :, :-1], a + _AWAY), "(40, 48, 19)"),
        (lambda hu, a: (hu, a @ np.diag([1.0, 1.0, 2.0, 1.0]) + _AWAY), "0.8x0.9x5 mm"),
        (lambda hu, a: (hu, a + _AWAY), "origin 100 mm"),
    ],
    ids=["shape", "spacing", "shifted"],
)
def test_mask_on_another_grid_names_both_files(tmp_path: Path, ct_and_path, change, fragment: str) -> None:
    ct, ct_path, hu = ct_and_path
    data, affine = change((hu == 75).astype(np.uint8), las_affine(hu.shape))
    path = write_nifti(tmp_path / "iph.nii.gz", data, affine)
    with pytest.raises(PatientInputError) as err:
        load_mask(path, ct, "iph", LABELS, False, "P01")
    msg = str(err.value)
    assert str(path) in msg and str(ct_path) in msg and fragment in msg and "(40, 48, 20)" in msg, msg
    assert "0.8x0.9x2.5 mm" in msg and "beyond the CT field of view" in msg


@pytest.mark.parametrize(
    ("values", "label_map", "problem"),
    [
        (lambda hu: (hu == 75) * 3, False, "binary mask expected"),
        (lambda hu: (hu == 75) * 7, True, "label map has values"),
        (lambda hu: np.where(hu == 75, 0.5, 0.0), False, "non-integer"),
        (lambda hu: hu, False, "non-integer values|binary mask expected"),
    ],
    ids=["value-3", "unknown-label", "fractional", "ct-as-mask"],
)
def test_bad_mask_values_raise(tmp_path: Path, ct_and_path, values, label_map: bool, problem: str) -> None:
    ct, _, hu = ct_and_path
    path = write_nifti(tmp_path / "iph.nii.gz", values(hu).astype(np.float32), las_affine(hu.shape))
    with pytest.raises(PatientInputError, match=f"patient P01, file {path}: IPH mask: .*({problem})"):
        load_mask(path, ct, "iph", LABELS, label_map, "P01")


def test_saved_nifti_carries_no_source_text(tmp_path: Path) -> None:
    src = write_nifti(tmp_path / "in.nii.gz", phantom_hu(), np.eye(4), descrip=b"Doe^Jane 19411203 MRN4711")
    raw = nib.load(src)
    raw.header["aux_file"] = b"Hospital"
    out = save_nifti(raw, tmp_path / "out.nii.gz")
    text = gzip.decompress(out.read_bytes())
    assert b"Doe" not in text and b"MRN4711" not in text and b"Hospital" not in text
    np.testing.assert_array_equal(nib.load(out).get_fdata(), raw.get_fdata())
    with pytest.raises(ValueError, match="must end in"):
        save_nifti(raw, tmp_path / "out.img")
