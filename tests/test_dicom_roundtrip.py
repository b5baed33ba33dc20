"""The synthetic cohort's DICOM writer: values and geometry survive a round trip through SimpleITK and
pydicom, the bytes equal pydicom's own writer, UIDs are deterministic and no personal data is written."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from hemexp.cohort.synth.anatomy import draw_anatomy
from hemexp.cohort.synth.cohort import save_nifti
from hemexp.cohort.synth.dicom_writer import affine_to_lps_geometry, write_dicom_series
from hemexp.cohort.synth.scan import draw_geometry, render_scan


@pytest.fixture(scope="module")
def scan() -> tuple[np.ndarray, np.ndarray]:
    """A simulated head CT (integer HU) and its affine, as `hemexp synth` writes them."""
    rng = np.random.default_rng(3)
    anat = draw_anatomy(rng, 70.0)
    geom = draw_geometry(rng, anat, 64, 3.5, (5.0, 5.0))
    return render_scan(anat, geom, None, rng).hu, geom.affine


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_sitk_reads_back_the_nifti_volume(tmp_path: Path, scan) -> None:
    hu, affine = scan
    write_dicom_series(hu, affine, tmp_path / "ct", "A001", "baseline head CT")
    save_nifti(hu.astype(np.int16), affine, tmp_path / "ct.nii.gz")
    dcm, nii = _read_series(tmp_path / "ct"), sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(dcm), sitk.GetArrayFromImage(nii))
    assert np.array_equal(sitk.GetArrayFromImage(dcm).transpose(2, 1, 0), hu)
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(dcm, get)(), getattr(nii, get)(), atol=1e-6, err_msg=get)


def test_pydicom_sorted_by_position_matches_nibabel(tmp_path: Path, scan) -> None:
    """Shuffled file order: sorting by ImagePositionPatient along the normal restores the volume."""
    hu, affine = scan
    paths = write_dicom_series(hu, affine, tmp_path / "ct", "A001", "baseline head CT")
    slices = [pydicom.dcmread(p) for p in reversed(paths)]
    normal = np.cross(*np.reshape(np.array(slices[0].ImageOrientationPatient, float), (2, 3)))
    slices.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
    vol = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices], -1)
    save_nifti(hu, affine, tmp_path / "ct.nii.gz")
    img = nib.load(tmp_path / "ct.nii.gz")
    assert np.array_equal(vol.transpose(1, 0, 2), img.get_fdata())
    ipp0 = np.array(slices[0].ImagePositionPatient, float)
    np.testing.assert_allclose(ipp0 * [-1, -1, 1], img.affine[:3, 3], atol=1e-6)  # LPS -> RAS
    np.testing.assert_allclose([float(v) for v in slices[0].PixelSpacing], img.header.get_zooms()[1::-1])
    assert float(slices[0].SliceThickness) == pytest.approx(img.header.get_zooms()[2])
    ds = slices[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    assert ds.PatientID == "A001" and str(ds.PatientName) == "" and ds.PatientBirthDate == ""
    assert ds.StudyDate == "" and ds.PatientIdentityRemoved == "YES"
    assert len({d.SeriesInstanceUID for d in slices}) == 1 and len({d.SOPInstanceUID for d in slices}) == len(slices)


def test_bytes_equal_pydicom_dcmwrite(tmp_path: Path, scan) -> None:
    """Reusing pre-encoded elements gives exactly what pydicom.dcmwrite writes for each slice."""
    hu, affine = scan
    paths = write_dicom_series(hu, affine, tmp_path / "ct", "A001", "baseline head CT")
    for path in (paths[0], paths[len(paths) // 2]):
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, pydicom.dcmread(path), enforce_file_format=True)
        assert buf.getvalue() == path.read_bytes()


def test_uids_are_deterministic(tmp_path: Path, scan) -> None:
    hu, affine = scan
    uid = {}
    for name, seed in (("a", "s1"), ("b", "s1"), ("c", "s2")):
        p = write_dicom_series(hu[:, :, :3], affine, tmp_path / name, "A001", "x", uid_seed=seed)[0]
        ds = pydicom.dcmread(p)
        uid[name] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert uid["a"] == uid["b"] and all(x != y for x, y in zip(uid["a"], uid["c"], strict=True))


def test_tilt_and_uneven_positions_override_the_header_geometry(tmp_path: Path) -> None:
    """Ingest tests fake gantry tilt / gaps: positions and orientation are written as given."""
    vol = np.arange(8 * 6 * 4, dtype=np.float32).reshape(8, 6, 4)
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    tilt = np.tan(np.radians(15.0))
    positions = [[0.0, -z * tilt, z] for z in (0.0, 2.0, 4.0, 9.0)]  # sheared stack with one gap
    orientation = [1.0, 0.0, 0.0, 0.0, 0.9659258, -0.2588190]
    paths = write_dicom_series(vol, affine, tmp_path / "ct", "P01", "tilted", slice_positions_lps=positions,
                               orientation_lps=orientation, gantry_tilt_deg=15.0, slice_thickness_mm=2.0)
    got = [pydicom.dcmread(p) for p in paths]
    np.testing.assert_allclose([[float(v) for v in d.ImagePositionPatient] for d in got], positions, atol=1e-6)
    np.testing.assert_allclose([float(v) for v in got[0].ImageOrientationPatient], orientation, atol=1e-6)
    assert float(got[0].GantryDetectorTilt) == 15.0
    assert np.array_equal(got[2].pixel_array.T - 1024, vol[:, :, 2])  # stored = HU - intercept


def test_geometry_of_an_oblique_affine() -> None:
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # i -> anterior, j -> left
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.9, 3.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    iop, spacing, ipp, step = affine_to_lps_geometry(affine, 2)
    np.testing.assert_allclose(iop, [0, -1, 0, 1, 0, 0], atol=1e-12)  # anterior = -P, left = +L
    assert spacing == pytest.approx((0.9, 0.8)) and step == pytest.approx(3.0)
    np.testing.assert_allclose(ipp[1], [-10.0, 20.0, 33.0])


def test_out_of_range_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int16"):
        write_dicom_series(np.full((2, 2, 2), 40000.0), np.eye(4), tmp_path / "ct", "P01", "x")
    assert not (tmp_path / "ct").exists()
