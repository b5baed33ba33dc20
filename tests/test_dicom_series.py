"""DICOM ingest: geometry (tilt, uneven spacing, LPS->RAS), series selection, rescale, de-identification.

Series are written here with pydicom from analytic phantoms defined in DICOM patient (LPS) space, so
every expectation is an independent world-coordinate fact, not a re-run of the reader's arithmetic.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from hemexp.core.errors import PatientInputError
from hemexp.io.dicom import series_info
from hemexp.io.ingest import load_ct
from hemexp.io.nifti import save_nifti

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PERSONAL = {
    "PatientName": "Doe^Janeprivate",
    "PatientID": "MRN-SECRET-4711",
    "PatientBirthDate": "19411203",
    "AccessionNumber": "ACC-998877",
    "StudyDate": "20230517",
    "StudyTime": "101112",
    "InstitutionName": "Saint Nowhere Hospital",
    "ReferringPhysicianName": "House^Gregoryprivate",
    "StudyID": "STUDY-5566",
}


def sample_world(fn: Callable[[np.ndarray], np.ndarray], iop: Sequence[float], ipp: Sequence[float],
                 spacing: tuple[float, float], rows: int, cols: int) -> np.ndarray:
    """HU image (rows, cols) of a world-space (LPS) function on one DICOM image plane."""
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    r, c = np.mgrid[0:rows, 0:cols]
    pts = np.asarray(ipp) + c[..., None] * spacing[1] * row_dir + r[..., None] * spacing[0] * col_dir
    return fn(pts)


def write_series(folder: Path, slices: np.ndarray, positions: Sequence[Sequence[float]], *,
                 iop: Sequence[float] = AXIAL, spacing: tuple[float, float] = (2.0, 2.0),
                 series_number: int = 2, description: str = "HEAD AXIAL", modality: str = "CT",
                 image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"), slope: float = 1.0,
                 intercept: float | Sequence[float] = -1024.0, personal: dict | None = None,
                 shuffle: bool = True) -> list[Path]:
    """Write HU slices (n, rows, cols) as a single-frame CT series; files in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    n = len(slices)
    intercepts = np.broadcast_to(np.asarray(intercept, dtype=float), (n,))
    order = np.random.default_rng(series_number).permutation(n) if shuffle else np.arange(n)
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.ImageType = modality, list(image_type)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series_number, description, int(order[k]) + 1
        for key, value in (personal or {}).items():
            setattr(ds, key, value)
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
        ds.PixelSpacing = [f"{v:g}" for v in spacing]
        ds.SliceThickness = "2.0"
        ds.ConvolutionKernel = "H30s"
        ds.Rows, ds.Columns = slices[k].shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercepts[k]:g}"
        stored = np.rint((slices[k] - intercepts[k]) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        path = folder / f"IM{order[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def blobs(centres_lps: Sequence[Sequence[float]], radius: float = 8.0) -> Callable[[np.ndarray], np.ndarray]:
    """World function: 0 HU background (an air border keeps it CT-like), 100 HU balls."""
    def fn(pts: np.ndarray) -> np.ndarray:
        out = np.zeros(pts.shape[:-1], dtype=np.float32)
        for c in centres_lps:
            out[np.linalg.norm(pts - np.asarray(c), axis=-1) <= radius] = 100.0
        out[..., :2, :] = -1000.0
        return out
    return fn


def blob_centroids_ras(img: nib.Nifti1Image, n: int) -> np.ndarray:
    """World (RAS) centroids of the n bright blobs, in ascending RAS x."""
    from scipy import ndimage

    data = img.get_fdata()
    lab, found = ndimage.label(data > 50)
    assert found == n
    cents = np.array(ndimage.center_of_mass(np.clip(data, 0, None), lab, range(1, n + 1)))
    world = nib.affines.apply_affine(img.affine, cents)
    return world[np.argsort(world[:, 0])]


def lps_to_ras(p: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(p, dtype=float) * np.array([-1.0, -1.0, 1.0])


CENTRES = [(-30.0, 10.0, 40.0), (25.0, -20.0, 60.0), (5.0, 35.0, 80.0)]


@pytest.mark.parametrize("mode", ["tilted_plane", "shifted_positions"])
def test_tilted_uneven_series_lands_at_true_world_coordinates(tmp_path: Path, mode: str) -> None:
    """A 20 degree gantry tilt with uneven table steps: blob centroids within half a voxel."""
    theta = np.radians(20.0)
    rows = cols = 64
    steps = np.r_[0.0, np.cumsum(np.where(np.arange(47) % 5 == 4, 3.0, 2.0))]  # 2 mm, every 5th gap 3 mm
    if mode == "tilted_plane":  # image plane tilted, table moves along z (real gantry tilt)
        iop = (1.0, 0.0, 0.0, 0.0, np.cos(theta), -np.sin(theta))
        positions = [(-64.0, -64.0 * np.cos(theta), 30.0 + z) for z in steps]
    else:  # axial plane, positions drift along y with z (how some converters describe tilt)
        iop = AXIAL
        positions = [(-64.0, -64.0 + np.tan(theta) * z, 30.0 + z) for z in steps]
    fn = blobs(CENTRES)
    slices = np.stack([sample_world(fn, iop, p, (2.0, 2.0), rows, cols) for p in positions])
    write_series(tmp_path / "ct", slices, positions, iop=iop)
    img = load_ct(tmp_path / "ct", "P01")
    info = img.extra["ingest"]
    assert info["tilt_deg"] == pytest.approx(20.0, abs=0.01)
    assert any("gantry tilt" in w for w in info["warnings"])
    assert not info["spacing_uniform"] and any("uneven" in w for w in info["warnings"])
    rot = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-6)  # a regular orthogonal grid
    voxel = np.linalg.norm(img.affine[:3, :3], axis=0)
    err = np.abs(blob_centroids_ras(img, 3) - lps_to_ras(sorted(CENTRES, key=lambda c: -c[0])))
    assert np.all(err <= voxel / 2), (err, voxel)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")


def test_plain_axial_series_geometry_is_exact(tmp_path: Path) -> None:
    """No tilt, even spacing: no resampling, affine = DICOM geometry converted to RAS."""
    positions = [(-64.0, -80.0, 20.0 + 2.5 * k) for k in range(30)]
    fn = blobs(CENTRES)
    slices = np.stack([sample_world(fn, AXIAL, p, (2.0, 2.0), 64, 64) for p in positions])
    write_series(tmp_path / "ct", slices, positions)
    img = load_ct(tmp_path / "ct", "P01")
    assert img.shape == (64, 64, 30) and img.extra["ingest"]["warnings"] == []
    # Voxel (i, j, k) of the RAS array holds DICOM column 63-i, row 63-j of slice k.
    expected = np.array([[2.0, 0, 0, 64.0 - 2 * 63], [0, 2.0, 0, 80.0 - 2 * 63], [0, 0, 2.5, 20.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(img.affine, expected, atol=1e-6)
    np.testing.assert_array_equal(img.get_fdata()[::-1, ::-1, :], slices.transpose(2, 1, 0))


def test_rescale_slope_and_intercept_applied_per_slice(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(5, 16, 16)).astype(np.float32) * 2  # even: exact at slope 2
    positions = [(0.0, 0.0, 3.0 * k) for k in range(5)]
    write_series(tmp_path / "ct", hu, positions, slope=2.0, intercept=[-1024, -1000, -2048, 0, -1024])
    img = load_ct(tmp_path / "ct", "P01")
    np.testing.assert_array_equal(img.get_fdata()[::-1, ::-1, :], np.clip(hu, -1024, 3071).transpose(2, 1, 0))


def test_selection_picks_thin_axial_series_over_localizer_and_thick_series(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "study"
    fn = blobs(CENTRES)
    thick = [(-64.0, -64.0, 20.0 + 5.0 * k) for k in range(16)]
    thin = [(-64.0, -64.0, 20.0 + 2.5 * k) for k in range(32)]
    write_series(folder / "s3", np.stack([sample_world(fn, AXIAL, p, (2.0, 2.0), 64, 64) for p in thick]),
                 thick, series_number=3, description="HEAD 5mm")
    write_series(folder / "s4", np.stack([sample_world(fn, AXIAL, p, (2.0, 2.0), 64, 64) for p in thin]),
                 thin, series_number=4, description="HEAD 2.5mm")
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    write_series(folder / "s1", np.full((1, 64, 64), -500.0), [(-64.0, 0.0, 100.0)], iop=coronal,
                 series_number=1, description="Topogram", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    (folder / "README.txt").write_text("not dicom")
    infos = series_info(folder, "P01")
    chosen = [i for i in infos if i["chosen"]]
    assert len(infos) == 3 and len(chosen) == 1 and chosen[0]["series_number"] == 4
    assert {i["series_number"]: i["rejected"] for i in infos}[1] == "localizer (scout) image"
    with caplog.at_level(logging.INFO, logger="hemexp.io.dicom"):
        img = load_ct(folder, "P01")
    assert img.shape[2] == 32 and img.extra["ingest"]["series_number"] == 4
    assert "using series 4:" in caplog.text and "most slices" in caplog.text
    assert "HEAD" not in caplog.text  # SeriesDescription is free text: never logged (docs/deidentification.md)


def _bad(folder: Path, **kw) -> None:
    write_series(folder, np.zeros((4, 8, 8)) - 100, [(0.0, 0.0, 2.0 * k) for k in range(4)], **kw)


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        (lambda f: None, "not found"),
        (lambda f: f.mkdir(), "no DICOM image files"),
        (lambda f: _bad(f, modality="MR"), "non-CT modality (MR)"),
        (lambda f: _bad(f, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "only localizer"),
        (lambda f: _bad(f, iop=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0)), "no usable axial CT series"),
        (lambda f: _truncate(_bad(f) or sorted(f.iterdir())[1]), "truncated or corrupt DICOM"),
        (lambda f: _bad(f) or (f / "IM0000.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10"), "truncated or corrupt DICOM"),
    ],
    ids=["missing", "empty", "mr", "localizer-only", "coronal-only", "truncated", "corrupt-header"],
)
def test_bad_dicom_inputs_raise_patient_input_error(tmp_path: Path, setup, problem: str) -> None:
    folder = tmp_path / "ct"
    setup(folder)
    with pytest.raises(PatientInputError) as err:
        load_ct(folder, "P07")
    msg = str(err.value)
    assert "patient P07" in msg and str(folder) in msg and problem in msg, msg


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])


def test_personal_tags_never_reach_info_logs_or_nifti(tmp_path: Path, caplog) -> None:
    positions = [(-64.0, -64.0, 2.0 * k) for k in range(6)]
    fn = blobs(CENTRES)
    slices = np.stack([sample_world(fn, AXIAL, p, (2.0, 2.0), 32, 32) for p in positions])
    write_series(tmp_path / "ct", slices, positions, personal=PERSONAL)
    assert pydicom.dcmread(next((tmp_path / "ct").iterdir())).PatientID == PERSONAL["PatientID"]
    with caplog.at_level(logging.DEBUG):
        infos = series_info(tmp_path / "ct", "P01")
        img = load_ct(tmp_path / "ct", "P01")
    out = save_nifti(img, tmp_path / "ct.nii.gz")
    raw = gzip.decompress(out.read_bytes()).decode("latin-1")
    texts = {"series_info": repr(infos), "ingest info": repr(img.extra), "log": caplog.text, "nifti": raw}
    for value in PERSONAL.values():
        for token in {value, *value.split("^")}:
            for where, text in texts.items():
                assert token not in text, f"{token!r} leaked into {where}"
    hdr = nib.load(out).header
    assert all(hdr[f].item().strip(b"\0 ") == b"" for f in ("descrip", "aux_file", "intent_name", "db_name"))


def test_compressed_fallback_decodes_with_simpleitk_once_rescaled(tmp_path: Path, monkeypatch) -> None:
    """A transfer syntax pydicom cannot decode goes through SimpleITK/GDCM, rescale applied once."""
    from pydicom.uid import RLELossless

    hu = np.random.default_rng(1).integers(-1000, 1000, size=(4, 16, 16)).astype(np.float32)
    paths = write_series(tmp_path / "ct", hu, [(0.0, 0.0, 2.0 * k) for k in range(4)], intercept=-1024.0)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        ds.save_as(p, enforce_file_format=True)
    expected = load_ct(tmp_path / "ct", "P01").get_fdata()

    def no_plugin(self):
        raise RuntimeError("Unable to decode the pixel data: no plugin")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_plugin))
    np.testing.assert_array_equal(load_ct(tmp_path / "ct", "P01").get_fdata(), expected)


def test_default_synthetic_cohort_has_no_garbage_slices(tmp_path: Path) -> None:
    """Every CT series of the default demo cohort is anatomy: the garbage-slice check must pass them all.

    Guards `make run`: with thick (5 mm) slices, interpolating across three slice steps at the skull
    base misses real anatomy on ~11 % of the pixels, which once rejected patient C006 as garbage.
    """
    from hemexp.cohort.synth.cohort import synthesize
    from hemexp.core.config import load_config
    from hemexp.io.dicom import garbage_slices
    from hemexp.io.ingest import load_ct

    cfg = load_config(None)
    cfg["results_dir"] = str(tmp_path / "results")
    synthesize(cfg, progress=False)
    folders = sorted((tmp_path / "results" / "raw").glob("*/*_ct"))
    assert len(folders) == 2 * cfg["cohort"]["synthetic"]["n_patients"]
    for folder in folders:
        ct = load_ct(folder, folder.parent.name)  # raises on a rejected slice
        assert garbage_slices(np.moveaxis(np.asarray(ct.dataobj), 2, 0)) == [], folder
