"""Masks from any common tool: NIfTI on any grid of the CT's physical space, DICOM SEG, `hemexp export-grid`.

The CT is a gantry-tilted synthetic DICOM series (HemExp ingests it onto its own tilt-corrected, oblique
grid, which no other tool makes); the lesion is an analytic ball in world space, so each mask below is
the ball rasterised on one grid: HemExp's own, a dcm2niix-style axial grid with 2.62 mm equidistant
slices, or the CT's own tilted slices (the SEG).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from workflow_helpers import manifest_config, write_config

from hemexp.cli import main
from hemexp.cohort.synth.dicom_writer import write_dicom_series
from hemexp.core.errors import PatientInputError
from hemexp.io.ingest import load_ct, load_mask
from hemexp.io.nifti import make_image

LABELS = {"iph": 1, "ivh": 2}
THETA = np.radians(20.0)
N_ROWS = N_COLS = 96  # 1 mm pixels
N_SLICES = 40  # table steps of 2 mm
IOP = np.array([1.0, 0.0, 0.0, 0.0, np.cos(THETA), -np.sin(THETA)])  # tilted image plane (LPS)
POSITIONS = np.array([(-48.0, -48.0 * np.cos(THETA), -10.0 + 2.0 * k) for k in range(N_SLICES)])
CENTRE_LPS = np.array([4.0, -3.0, 6.0])
CENTRE2_LPS = np.array([-14.0, 8.0, 10.0])
RADIUS = 12.0


def _plane_points(k: int) -> np.ndarray:
    """LPS centres (cols, rows, 3) of slice k's pixels (index [col, row] as the writer stores volumes)."""
    c, r = np.meshgrid(np.arange(N_COLS), np.arange(N_ROWS), indexing="ij")
    return POSITIONS[k] + c[..., None] * IOP[:3] + r[..., None] * IOP[3:]


def ball(points_lps: np.ndarray, centre=CENTRE_LPS, radius=RADIUS) -> np.ndarray:
    return np.linalg.norm(points_lps - centre, axis=-1) <= radius


def ras_points(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(float)
    return nib.affines.apply_affine(affine, ijk)


def lps(points_ras: np.ndarray) -> np.ndarray:
    return points_ras * np.array([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def tilted(tmp_path_factory):
    """(folder of the tilted CT series, its ingested CT image)."""
    folder = tmp_path_factory.mktemp("tilt") / "ct"
    vol = np.full((N_COLS, N_ROWS, N_SLICES), 30.0, np.float32)
    for k in range(N_SLICES):
        pts = _plane_points(k)
        vol[:, :, k][ball(pts)] = 70.0
        vol[:, :, k][np.linalg.norm(pts[..., :2], axis=-1) > 46] = -1000.0
    write_dicom_series(vol, np.diag([1.0, 1.0, 2.0, 1.0]), folder, "TILT01", "HEAD AXIAL",
                       orientation_lps=IOP, slice_positions_lps=POSITIONS, gantry_tilt_deg=20.0)
    ct = load_ct(folder, "TILT01")
    assert ct.extra["ingest"]["tilt_deg"] == pytest.approx(20.0, abs=0.01)
    return folder, ct


def native_mask(ct) -> np.ndarray:
    return ball(lps(ras_points(ct.shape, ct.affine))).astype(np.uint8)


def volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    return float(mask.sum()) * abs(np.linalg.det(affine[:3, :3])) / 1000


def dcm2niix_grid(shift_ras=(0.0, 0.0, 0.0)) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axial grid with 2.62 mm equidistant slices over the same head (how dcm2niix writes a tilted series)."""
    shape = (90, 80, 20)
    affine = np.diag([1.0, 1.0, 2.62, 1.0])
    affine[:3, 3] = np.array([-45.0, -45.0, -20.0]) + np.asarray(shift_ras)
    return shape, affine


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))
    return path


def test_mask_on_dcm2niix_grid_of_tilted_series_is_resampled(tmp_path: Path, tilted) -> None:
    _, ct = tilted
    shape, affine = dcm2niix_grid()
    drawn = ball(lps(ras_points(shape, affine))).astype(np.uint8)
    path = save(tmp_path / "iph.nii.gz", drawn, affine)
    mask = load_mask(path, ct, "iph", LABELS, False, "TILT01")
    got = np.asarray(mask.dataobj)
    truth = native_mask(ct)
    assert mask.shape == ct.shape and np.array_equal(mask.affine, ct.affine) and got.dtype == np.uint8
    v_got, v_truth = volume_ml(got, ct.affine), volume_ml(truth, ct.affine)
    assert abs(v_got - v_truth) <= 0.02 * v_truth, (v_got, v_truth)
    dice = 2 * np.sum(got & truth) / (got.sum() + truth.sum())
    assert dice > 0.9, dice
    facts = mask.extra["mask_ingest"]
    assert facts["resampled"] and abs(facts["ct_grid_ml"] - facts["source_ml"]) <= 0.05 * facts["source_ml"]


def test_mask_outside_the_field_of_view_is_rejected(tmp_path: Path, tilted) -> None:
    folder, ct = tilted
    shape, affine = dcm2niix_grid(shift_ras=(0.0, 0.0, 150.0))  # 150 mm above: another scan's geometry
    drawn = ball(lps(ras_points(shape, dcm2niix_grid()[1]))).astype(np.uint8)
    path = save(tmp_path / "iph.nii.gz", drawn, affine)
    with pytest.raises(PatientInputError) as err:
        load_mask(path, ct, "iph", LABELS, False, "TILT01")
    msg = str(err.value)
    assert "patient TILT01" in msg and str(path) in msg and "mm beyond the CT field of view" in msg, msg
    assert "does not match CT grid" in msg and str(folder) in msg, msg


def test_mask_losing_volume_is_rejected(tmp_path: Path, tilted) -> None:
    """A thin shell on a much finer grid falls between the CT's voxel centres: rejected, not shrunk."""
    _, ct = tilted
    affine = np.diag([0.25, 0.25, 0.25, 1.0])
    affine[:3, 3] = (-20.0, -20.0, -10.0)
    pts = lps(ras_points((160, 160, 80), affine))
    d = np.linalg.norm(pts - CENTRE_LPS, axis=-1)
    path = save(tmp_path / "iph.nii.gz", (np.abs(d - 8.0) < 0.2).astype(np.uint8), affine)
    with pytest.raises(PatientInputError, match="patient TILT01.*(volume changes from|vanishes)"):
        load_mask(path, ct, "iph", LABELS, False, "TILT01")


def test_exact_grid_mask_is_unchanged(tmp_path: Path, tilted) -> None:
    _, ct = tilted
    truth = native_mask(ct)
    # Stored in another orientation than the CT (LPS voxel order), as exporters may: still the same grid.
    flipped = make_image(truth, ct.affine).as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    path = save(tmp_path / "iph.nii.gz", np.asarray(flipped.dataobj), flipped.affine)
    mask = load_mask(path, ct, "iph", LABELS, False, "TILT01")
    np.testing.assert_array_equal(np.asarray(mask.dataobj), truth)
    np.testing.assert_array_equal(mask.affine, ct.affine)
    assert mask.extra["mask_ingest"] == {"format": "nifti", "resampled": False}


def _write_seg(folder: Path, path: Path, segments: dict[str, tuple[int, np.ndarray]]) -> Path:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    descriptions, arrays = [], []
    for label, (number, centre) in segments.items():
        frames = np.stack([ball(_plane_points(k), centre=centre).T for k in range(N_SLICES)])  # (frames, rows, cols)
        arrays.append(frames)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Hemorrhage, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
    pixels = np.stack(arrays, axis=-1).astype(np.uint8) if len(arrays) > 1 else arrays[0].astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="HemExp test", manufacturer_model_name="test", software_versions="0",
        device_serial_number="0")
    seg.save_as(path)
    return path


def test_dicom_seg_round_trip(tmp_path: Path, tilted) -> None:
    folder, ct = tilted
    path = _write_seg(folder, tmp_path / "seg.dcm", {"IPH": (1, CENTRE_LPS), "IVH": (2, CENTRE2_LPS)})
    pts = lps(ras_points(ct.shape, ct.affine))
    for which, centre in (("iph", CENTRE_LPS), ("ivh", CENTRE2_LPS)):
        mask = load_mask(path, ct, which, LABELS, True, "TILT01")
        got, truth = np.asarray(mask.dataobj), ball(pts, centre=centre).astype(np.uint8)
        assert mask.extra["mask_ingest"]["format"] == "dicom-seg"
        v_got, v_truth = volume_ml(got, ct.affine), volume_ml(truth, ct.affine)
        assert abs(v_got - v_truth) <= 0.02 * v_truth, (which, v_got, v_truth)
        assert 2 * np.sum(got & truth) / (got.sum() + truth.sum()) > 0.9


def test_dicom_seg_single_segment_and_bad_file(tmp_path: Path, tilted) -> None:
    folder, ct = tilted
    path = _write_seg(folder, tmp_path / "seg.dcm", {"Hematoma": (1, CENTRE_LPS)})
    assert np.asarray(load_mask(path, ct, "iph", LABELS, False, "TILT01").dataobj).sum() > 0
    with pytest.raises(PatientInputError, match="no segment named IVH"):
        load_mask(path, ct, "ivh", LABELS, True, "TILT01")
    junk = tmp_path / "mask.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(PatientInputError, match="patient TILT01.*not a readable DICOM SEG"):
        load_mask(junk, ct, "iph", LABELS, False, "TILT01")


def _config(tmp_path: Path, ct_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    row = {"patient_id": "TILT01", "site": "A", "split": "train", "baseline_ct": str(ct_path),
           "followup_ct": "fu_ct.nii.gz", "baseline_iph": "x.nii.gz", "baseline_ivh": "x.nii.gz",
           "followup_iph": "x.nii.gz", "followup_ivh": "x.nii.gz", "onset_to_ct_h": 2.0, "anticoagulant": 0,
           "antiplatelet": 1, "age": 70, "gcs": 12, "sbp": 170, "baseline_iph_ml": 5.0}
    pd.DataFrame([row]).to_csv(raw / "manifest.tsv", sep="\t", index=False)
    return write_config(tmp_path / "config.yaml", manifest_config(raw / "manifest.tsv", tmp_path / "results"))


def test_export_grid_writes_the_ingested_ct(tmp_path: Path, tilted, capsys) -> None:
    folder, ct = tilted
    cfg = _config(tmp_path, folder)
    assert main(["export-grid", "TILT01", "--config", str(cfg)]) == 0
    out = tmp_path / "results" / "annotation" / "TILT01_baseline_ct.nii.gz"
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, ct.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj, np.float32), np.asarray(ct.dataobj))
    # A mask drawn on the exported grid is an exact-grid mask: taken as it is.
    path = save(tmp_path / "iph.nii.gz", native_mask(ct), img.affine)
    assert load_mask(path, ct, "iph", LABELS, False, "TILT01").extra["mask_ingest"]["resampled"] is False
    other = tmp_path / "elsewhere" / "ct.nii"
    assert main(["export-grid", "TILT01", "--out", str(other), "--config", str(cfg)]) == 0
    assert other.exists()


@pytest.mark.parametrize("pid", ["../../etc/x", "-rf", "a/b"])
def test_export_grid_refuses_hostile_id(tmp_path: Path, tilted, capsys, pid: str) -> None:
    folder, _ = tilted
    cfg = _config(tmp_path, folder)
    assert main(["export-grid", pid, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "patient ID" in err or "arguments are required" in err, err
    assert not (tmp_path / "results" / "annotation").exists()
    assert not list(tmp_path.rglob("*_ct.nii.gz"))
