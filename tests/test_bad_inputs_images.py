"""Bad images never crash, never pass silently, never escape: every foreseeable image problem (NIfTI,
DICOM, masks, baseline/follow-up identity) is one PatientInputError line naming patient, file and
problem, ``hemexp ingest`` exits 1 and leaves no ``results/ingested/<p>`` behind; repairable DICOM
damage is repaired and said so in the ingest info. Volumes are tiny (32x32x12) so this stays fast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from hemexp.cli import main
from hemexp.cohort.synth.dicom_writer import write_dicom_series
from hemexp.core.errors import PatientInputError
from hemexp.io.dicom import garbage_slices, kernel_class
from hemexp.io.ingest import load_ct
from hemexp.preprocess.identity import identity_ncc, identity_region

SHAPE = (32, 32, 12)
SPACING = (6.0, 6.0, 8.0)
CLINICAL = {"onset_to_ct_h": 2.0, "anticoagulant": 0, "antiplatelet": 1, "age": 70, "gcs": 12, "sbp": 170}


def affine(spacing=SPACING) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = -(np.array(SHAPE) - 1) / 2 * np.array(spacing)
    return a


def head(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Integer HU: air, a skull shell, brain with noise, smooth along z (so no slice looks like garbage)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    r = np.sqrt(x**2 + y**2 + (0.7 * z) ** 2)
    hu = np.full(shape, -1000.0, np.float32)
    hu[r < 0.9] = 800.0
    brain = r < 0.78
    hu[brain] = 30.0 + rng.normal(0, 3, int(brain.sum()))
    hu[(x - 0.3) ** 2 + y**2 + z**2 < 0.06] = 70.0
    return np.rint(hu)


def lesion(shape=SHAPE) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return ((x - 0.3) ** 2 + y**2 + z**2 < 0.06).astype(np.uint8)


def save(path: Path, data: np.ndarray, aff: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine() if aff is None else aff), str(path))
    return path


def save_raw_affine(path: Path, data: np.ndarray, rows: list[list[float]]) -> Path:
    """A NIfTI whose sform holds ``rows`` verbatim (qform off): how a broken converter writes a bad affine."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    for key, row in zip(("srow_x", "srow_y", "srow_z"), rows, strict=True):
        hdr[key] = row
    nib.save(nib.Nifti1Image(data.astype(np.float32), None, hdr), str(path))
    return path


def dicom(folder: Path, vol: np.ndarray, pid: str = "P", number: int = 2, kernel: str = "STANDARD",
          description: str = "HEAD", seed: str | None = None, aff: np.ndarray | None = None) -> Path:
    write_dicom_series(vol, affine() if aff is None else aff, folder, pid, description, series_number=number,
                       kernel=kernel, uid_seed=seed or f"{folder}/{number}")
    return folder


@pytest.fixture()
def cohort(tmp_path: Path):
    """A raw folder with one good patient's files and a function that runs ``hemexp ingest`` on a
    manifest row with some columns replaced; returns (exit code, stderr, results dir)."""
    raw = tmp_path / "raw"
    files = {
        "baseline_ct": save(raw / "bl_ct.nii.gz", head(0)),
        "followup_ct": save(raw / "fu_ct.nii.gz", head(1)),
        "baseline_iph": save(raw / "bl_iph.nii.gz", lesion()),
        "baseline_ivh": save(raw / "bl_ivh.nii.gz", np.zeros(SHAPE, np.uint8)),
        "followup_iph": save(raw / "fu_iph.nii.gz", lesion()),
        "followup_ivh": save(raw / "fu_ivh.nii.gz", np.zeros(SHAPE, np.uint8)),
    }
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    results = tmp_path / "results"
    cfg["results_dir"] = str(results)

    def run(pid: str, capsys, **override) -> tuple[int, str, Path]:
        row = {"patient_id": pid, "site": "A", "split": "train", "expansion": 0, "he_prob": "",
               **{k: str(Path(v).relative_to(raw)) for k, v in files.items()}, "baseline_iph_ml": 12.0, **CLINICAL}
        row.update({k: (str(Path(v).relative_to(raw)) if isinstance(v, Path) else v) for k, v in override.items()})
        pd.DataFrame([row]).to_csv(raw / "manifest.tsv", sep="\t", index=False)
        cfg["cohort"].update(source="manifest", manifest=str(raw / "manifest.tsv"))
        cfg_path = tmp_path / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        capsys.readouterr()
        code = main(["ingest", pid, "--config", str(cfg_path)])
        return code, capsys.readouterr().err, results

    return raw, run


# ---------------------------------------------------------------- the cases: (column, writer, problem)
# writer(raw) -> path of the bad file (placed in ``column`` of the manifest row)


def _nan_voxels(raw):
    d = head()
    d[4, 4, 4] = np.nan
    return save(raw / "nanvox_ct.nii.gz", d)


def _inf_voxels(raw):
    d = head()
    d[5:7, 5, 5] = np.inf
    return save(raw / "infvox_ct.nii.gz", d)


def _truncated(raw):
    p = save(raw / "trunc_ct.nii.gz", head())
    p.write_bytes(p.read_bytes()[:2000])
    return p


def _mask_like(raw, name, data):
    return save(raw / name, data)


def _garbage_dicom(where: list[int], value: float | None):
    def make(raw):
        vol = head()
        rng = np.random.default_rng(3)
        for k in where:
            vol[:, :, k] = value if value is not None else rng.integers(-1000, 3000, SHAPE[:2])
        return dicom(raw / f"garbage_{'_'.join(map(str, where))}", vol)
    return make


def _two_patients(raw):
    folder = raw / "two_patients"
    dicom(folder / "a", head(0), pid="ALPHA", number=2)
    dicom(folder / "b", head(1), pid="BETA", number=3)
    return folder


def _two_equal_series(raw):
    folder = raw / "two_series"
    dicom(folder / "a", head(0), number=2)
    dicom(folder / "b", head(1), number=3)
    return folder


def _mask_of_other_series(raw):
    """Soft-kernel series of 12 slices (chosen) and a bone series of 10; the IPH mask was drawn on the latter."""
    folder = raw / "mixed"
    dicom(folder / "a", head(0), number=5, kernel="H30s")
    dicom(folder / "b", head(1)[:, :, :10], number=2, kernel="H70h")
    return folder


CASES = [
    # NIfTI CT
    ("baseline_ct", lambda raw: save_raw_affine(raw / "singular_ct.nii.gz", head(), [[6, 0, 0, 0], [0, 6, 0, 0], [0, 0, 0, 0]]),
     "affine (sform/qform) is singular"),
    ("baseline_ct", lambda raw: save_raw_affine(raw / "collinear_ct.nii.gz", head(), [[6, 6, 0, 0], [0, 0, 0, 0], [0, 0, 8, 0]]),
     "affine (sform/qform) is singular"),
    ("baseline_ct", lambda raw: save_raw_affine(raw / "nanaff_ct.nii.gz", head(), [[6, 0, np.nan, 0], [0, 6, 0, 0], [0, 0, 8, 0]]),
     "affine (sform/qform) has NaN/inf entries"),
    ("followup_ct", lambda raw: save_raw_affine(raw / "tiny_ct.nii.gz", head(), [[1e-4, 0, 0, 0], [0, 6, 0, 0], [0, 0, 8, 0]]),
     "implausible voxel size"),
    ("baseline_ct", _nan_voxels, "NaN/inf voxels"),
    ("followup_ct", _inf_voxels, "NaN/inf voxels"),
    ("baseline_ct", lambda raw: save(raw / "slice2d_ct.nii.gz", head()[:, :, 0]), "must be a 3D volume, got 2D"),
    ("baseline_ct", lambda raw: save(raw / "series4d_ct.nii.gz", np.stack([head(), head(1)], -1)), "got 4D data"),
    ("baseline_ct", lambda raw: save(raw / "oneslice_ct.nii.gz", head()[:, :, :1]), "a single slice"),
    ("baseline_ct", lambda raw: (raw / "empty_ct.nii.gz").write_bytes(b"") or raw / "empty_ct.nii.gz", "empty (0 bytes)"),
    ("followup_ct", _truncated, "truncated or corrupt"),
    # masks
    ("baseline_iph", lambda raw: _mask_like(raw, "full_iph.nii.gz", np.ones(SHAPE, np.uint8)), "mask covers the whole volume"),
    ("followup_iph", lambda raw: _mask_like(raw, "inverted_iph.nii.gz", 1 - lesion()), "% of the volume"),
    ("baseline_iph", lambda raw: _mask_like(raw, "none_iph.nii.gz", np.zeros(SHAPE, np.uint8)),
     "baseline IPH mask is empty (no hemorrhage to model) although the manifest says baseline_iph_ml=12"),
    ("baseline_ivh", lambda raw: save_raw_affine(raw / "singular_ivh.nii.gz", np.zeros(SHAPE), [[6, 0, 0, 0], [0, 6, 0, 0], [0, 0, 0, 0]]),
     "IVH mask voxel-to-world affine (sform/qform) is singular"),
    # DICOM
    ("baseline_ct", _garbage_dicom([0], 2000.0), "implausible pixel data at the end of the stack"),
    ("baseline_ct", _garbage_dicom([5, 6], None), "adjacent to repair"),
    ("baseline_ct", _garbage_dicom([2, 5, 8], 0.0), "too many or adjacent to repair"),
    ("baseline_ct", _two_patients, "two series of different patients in one folder"),
    ("followup_ct", _two_equal_series, "two series in one folder that fit equally well"),
]


@pytest.mark.parametrize("column, writer, problem", CASES, ids=[
    "singular-affine", "collinear-affine", "nan-affine", "tiny-voxel", "nan-voxels", "inf-voxels", "2d", "4d",
    "single-slice", "zero-bytes", "truncated-gz", "mask-whole-volume", "mask-inverted", "mask-empty-vs-manifest",
    "mask-singular-affine", "dicom-garbage-end-slice", "dicom-garbage-adjacent", "dicom-garbage-many",
    "dicom-two-patients", "dicom-two-series"])
def test_bad_image_fails_one_patient_cleanly(cohort, capsys, column, writer, problem):
    raw, run = cohort
    bad = writer(raw)
    pid = "BAD01"
    code, err, results = run(pid, capsys, **{column: bad})
    assert code == 1, err
    assert f"patient {pid}" in err and bad.name in err and problem in err, err
    assert "Traceback" not in err
    assert not (results / "ingested" / pid).exists()
    assert not list((results / "ingested").glob(f".{pid}*"))
    record = json.loads((results / "qc" / "failures" / f"ingest__{pid}.json").read_text())
    assert record["patient_id"] == pid and bad.name in record["file"] and problem in record["problem"]


def test_mask_drawn_on_the_other_series_says_two_series(cohort, capsys):
    raw, run = cohort
    folder = _mask_of_other_series(raw)
    # Drawn on the other series of the same study (same physical space): resampled onto the chosen one.
    mask = save(raw / "other_iph.nii.gz", lesion()[:, :, :10])
    ivh = save(raw / "other_ivh.nii.gz", np.zeros((32, 32, 10), np.uint8))
    code, err, results = run("MIX", capsys, baseline_ct=folder, baseline_iph=mask, baseline_ivh=ivh)
    assert code == 0, err
    got = np.asarray(nib.load(results / "ingested" / "MIX" / "bl_iph.nii.gz").dataobj)
    assert got.sum() == lesion()[:, :, :10].sum()
    # The same mask with a geometry outside the CT's space: rejected, with the two-series hint.
    away = affine() + np.array([[0, 0, 0, 500.0]] * 3 + [[0, 0, 0, 0]])
    mask = save(raw / "away_iph.nii.gz", lesion()[:, :, :10], away)
    code, err, results = run("MIX2", capsys, baseline_ct=folder, baseline_iph=mask, baseline_ivh=ivh)
    assert code == 1
    assert "beyond the CT field of view" in err, err
    assert "patient MIX2" in err and mask.name in err and "does not match CT grid" in err
    assert "2 usable series (two series or more in one folder" in err and "fits series 2 instead" in err, err
    assert not (results / "ingested" / "MIX2").exists()


@pytest.mark.parametrize("same", ["path", "copy"])
def test_followup_identical_to_baseline_is_refused(cohort, capsys, same):
    raw, run = cohort
    if same == "path":  # a hard link: another name for the same file (the manifest check sees two files)
        fu, problem = raw / "alias_ct.nii.gz", "follow-up CT is the same file as the baseline CT"
        os.link(raw / "bl_ct.nii.gz", fu)
    else:
        fu = save(raw / "copy_ct.nii.gz", np.asarray(nib.load(raw / "bl_ct.nii.gz").dataobj))
        problem = "pixel data identical to the baseline CT"
    code, err, results = run("TWIN", capsys, followup_ct=fu)
    assert code == 1 and "patient TWIN" in err and fu.name in err and problem in err, err
    assert not (results / "ingested" / "TWIN").exists()


# ---------------------------------------------------------------- DICOM: repaired, chosen, explained


def test_interior_garbage_slice_is_interpolated_and_reported(tmp_path):
    vol = head()
    for value in (3000.0, None):
        bad = vol.copy()
        bad[:, :, 6] = value if value is not None else np.random.default_rng(0).integers(-1000, 3000, SHAPE[:2])
        folder = dicom(tmp_path / f"g{value}", bad)
        img = load_ct(folder, "P01")
        info = img.extra["ingest"]
        assert any("replaced by interpolation" in w and "slice 7 of 12" in w for w in info["warnings"]), info["warnings"]
        got = np.asarray(img.dataobj)[:, :, 6]
        expect = 0.5 * (vol[:, :, 5] + vol[:, :, 7])
        assert np.abs(got - np.clip(expect, -1024, 3071)).max() < 1.0


def test_clean_series_has_no_garbage_slices():
    assert garbage_slices(np.moveaxis(head(), 2, 0)) == []
    assert garbage_slices(np.moveaxis(head(4, shape=(40, 40, 30)), 2, 0)) == []


def test_slice_with_other_matrix_is_dropped_and_interpolated(tmp_path):
    folder = tmp_path / "ct"
    vol = head()
    dicom(folder, vol, seed="odd")
    import pydicom

    path = folder / "IM0006.dcm"
    ds = pydicom.dcmread(path)
    small = np.full((16, 16), 40, np.int16)
    ds.Rows, ds.Columns, ds.PixelData = 16, 16, small.tobytes()
    ds.save_as(path)
    img = load_ct(folder, "P01")
    info = img.extra["ingest"]
    assert img.shape == SHAPE  # the regular grid (and so the masks' grid) is kept
    assert any("different matrix" in w and "IM0006.dcm" in w and "dropped" in w for w in info["warnings"])
    assert any("filled by interpolation" in w for w in info["warnings"])


def test_soft_kernel_preferred_over_bone_with_lower_series_number(tmp_path):
    folder = tmp_path / "study"
    dicom(folder / "bone", head(0), number=2, kernel="BONE")  # more slices, lower number: won before
    dicom(folder / "soft", head(0)[:, :, :10], number=3, kernel="STANDARD", description="SECRET TEXT 17")
    dicom(folder / "lung", head(0), number=1, kernel="LUNG")
    img = load_ct(folder, "P01")
    info = img.extra["ingest"]
    assert info["series_number"] == 3 and info["kernel_class"] == "soft" and img.shape[2] == 10
    assert "soft-tissue kernel preferred over 1 bone-kernel series, 1 lung-kernel series" in info["selection_reason"]
    assert "SECRET" not in info["selection_reason"] and "SECRET" not in json.dumps(info["usable_series"])


@pytest.mark.parametrize("kernel, description, expected", [
    ("STANDARD", "", "soft"), ("SOFT", "", "soft"), ("BONE", "", "bone"), ("BONEPLUS", "", "bone"),
    ("LUNG", "", "lung"), ("H30s", "", "soft"), ("Hr38", "", "soft"), ("H70h", "", "sharp"), ("Br64", "", "sharp"),
    ("FC26", "", "soft"), ("FC35", "", "bone"), ("", "Head BONE 1.0", "bone"), ("", "BRAIN 5mm", "soft"),
    ("", "HEAD AXIAL", "unknown"), ("H30s", "BONE", "soft"),
])
def test_kernel_class(kernel, description, expected):
    assert kernel_class(kernel, ("ORIGINAL", "PRIMARY", "AXIAL"), description) == expected


# ---------------------------------------------------------------- identity measure on known shapes


def _textured(seed: int, shape=(24, 24, 24)) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return (40 + 30 * ndimage.gaussian_filter(rng.standard_normal(shape), 2) / 0.05).astype(np.float32)


@pytest.mark.parametrize("make_b, lo, hi", [
    (lambda a: a, 0.999, 1.0),  # identical
    (lambda a: 2 * a - 20, 0.99, 1.0),  # affine intensity change: NCC is invariant (inside the window)
    (lambda a: 80 - a, -1.0, -0.95),  # contrast inverted
    (lambda a: _textured(99), -0.3, 0.3),  # another random texture
])
def test_identity_ncc_known_answers(make_b, lo, hi):
    a = np.clip(_textured(1), 10, 70)
    region = np.ones(a.shape, bool)
    value = identity_ncc(a, np.clip(make_b(a), 0, 100), region, window=(0, 100))
    assert lo <= value <= hi, value


def test_identity_ncc_constant_and_tiny_region():
    a = _textured(1)
    assert identity_ncc(a, np.full(a.shape, 30.0), np.ones(a.shape, bool)) == 0.0
    small = np.zeros(a.shape, bool)
    small[:2, :2, :2] = True
    assert np.isnan(identity_ncc(a, a, small))


def test_identity_region_leaves_out_lesions_and_non_brain():
    brain = np.zeros((20, 20, 20), np.uint8)
    brain[2:18, 2:18, 2:18] = 1
    les = np.zeros_like(brain)
    les[9:11, 9:11, 9:11] = 1
    region = identity_region(brain, brain, [les], margin_vox=2)
    assert not region[8:12, 8:12, 8:12].any() and region[4, 4, 4] and not region[0].any()


def test_low_identity_fails_the_patient():
    from hemexp.preprocess.pipeline import _check

    summary = {"volumes_ml_model_grid": {"baseline": {"iph": 5.0}}, "registration": {"brain_dice": 0.97},
               "identity": {"ncc": 0.41}}
    row = pd.Series({"baseline_iph": "bl_iph.nii.gz", "followup_ct": "raw/P9/followup_ct"})
    with pytest.raises(PatientInputError) as err:
        _check(summary, row, "P9", 0.8, 0.85)
    msg = str(err.value)
    assert "patient P9" in msg and "raw/P9/followup_ct" in msg and "identity.ncc 0.410 < preprocess.min_identity_ncc" in msg
    summary["identity"]["ncc"] = float("nan")
    with pytest.raises(PatientInputError):
        _check(summary, row, "P9", 0.8, 0.85)
    summary["identity"]["ncc"] = 0.95
    _check(summary, row, "P9", 0.8, 0.85)


