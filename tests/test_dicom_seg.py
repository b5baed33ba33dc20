"""DICOM outputs (hemexp.io.dicom_seg, hemexp.sampling.products.write_dicom_products): the de-identified
baseline CT series and the binary/fractional SEGs read back voxel-for-voxel onto the NIfTI grid, reference
the written series, carry no PHI and pass dciodvfy (when dicom3tools is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from hemexp.core.files import read_json
from hemexp.core.layout import DICOM_DIR
from hemexp.io.dicom_seg import (
    MAX_FRACTIONAL_VALUE,
    SliceGeometry,
    dicom_output_enabled,
    write_dicom_outputs,
)
from hemexp.io.nifti import make_image, save_nifti
from hemexp.sampling.products import MAP_KINDS, VOLUME_COLUMNS, median_sample, write_dicom_products

SHAPE = (14, 11, 6)
SENTINEL = "SENTINEL^PHI^NAME"


def _affine() -> np.ndarray:
    """Oblique-free, anisotropic, off-centre RAS grid (what ingest writes: canonical RAS+)."""
    aff = np.diag([0.9, 0.75, 2.5, 1.0])
    aff[:3, 3] = [-6.3, 12.1, -40.0]
    return aff


def _arrays(seed: int = 0) -> tuple[nib.Nifti1Image, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ct = make_image(rng.normal(40, 30, SHAPE).round().astype(np.float32), _affine())
    ct.header["descrip"] = SENTINEL.encode()  # nothing from the NIfTI header may reach the DICOM
    iph = np.zeros(SHAPE, np.uint8)
    iph[3:9, 2:7, 1:4] = 1
    iph[10, 9, 5] = 1  # an isolated voxel near a corner: orientation errors move it
    ivh = np.zeros(SHAPE, np.uint8)
    ivh[1:3, 6:9, 2] = 1
    maps = {k: (rng.random(SHAPE) * (rng.random(SHAPE) > 0.4)).astype(np.float32) for k in MAP_KINDS}
    return ct, {"iph": iph, "ivh": ivh}, maps


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nib.Nifti1Image, dict, dict, dict]:
    ct, masks, maps = _arrays()
    out = tmp_path_factory.mktemp("dcm") / DICOM_DIR
    info = write_dicom_outputs(out, ct, masks, maps, "P007", {"p_expansion": 0.4})
    return out, ct, masks, maps, info


def _ct_series(out: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(f) for f in (out / "ct").glob("*.dcm")), key=lambda d: int(d.InstanceNumber))


def _seg_volume(seg: hd.seg.Segmentation, series: list[pydicom.Dataset], geom: SliceGeometry) -> np.ndarray:
    """``[X, Y, Z, segments]`` on the NIfTI grid, frames placed through the referenced CT instances."""
    n = len(seg.SegmentSequence)
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in series], segment_numbers=list(range(1, n + 1)),
        combine_segments=False, ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    return np.stack([geom.from_frames(frames[..., s]) for s in range(n)], axis=-1)


def test_geometry_round_trip_any_orientation() -> None:
    """to_frames/from_frames invert each other, and IPP/IOP/PixelSpacing place every voxel where the
    NIfTI affine does (LPS = RAS with x, y negated), also for a flipped (LAS, z-down) grid."""
    for aff in (_affine(), np.diag([-1.2, 0.8, -3.0, 1.0]) + np.array([[0, 0, 0, 5.0]] * 3 + [[0, 0, 0, 0]])):
        geom = SliceGeometry.of(aff, SHAPE)
        vol = np.arange(np.prod(SHAPE)).reshape(SHAPE)
        assert np.array_equal(geom.from_frames(geom.to_frames(vol)), vol)
        frames = geom.to_frames(vol)
        x, y = np.asarray(geom.orientation[:3]), np.asarray(geom.orientation[3:])
        dr, dc = geom.pixel_spacing
        for k, r, c in ((0, 0, 0), (SHAPE[2] - 1, 3, 7), (2, SHAPE[1] - 1, SHAPE[0] - 1)):
            lps = np.asarray(geom.positions[k]) + c * dc * x + r * dr * y
            i, j, kk = np.argwhere(vol == frames[k, r, c])[0]
            ras = aff @ np.array([i, j, kk, 1.0])
            assert np.allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-6)
        assert geom.thickness == pytest.approx(abs(aff[2, 2]))


def test_ct_series_geometry_and_pixels(written) -> None:
    out, ct, *_ = written
    series = _ct_series(out)
    geom = SliceGeometry.of(ct.affine, ct.shape)
    assert len(series) == SHAPE[2] and len({d.SeriesInstanceUID for d in series}) == 1
    for k, ds in enumerate(series):
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], geom.positions[k], atol=1e-5)
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])  # RAS -> radiological
        assert np.allclose([float(v) for v in ds.PixelSpacing], [0.75, 0.9])
        assert float(ds.SliceThickness) == pytest.approx(2.5)
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in series])
    assert np.array_equal(geom.from_frames(hu), np.asarray(ct.dataobj))


def test_binary_seg_matches_masks(written) -> None:
    out, ct, masks, _, _ = written
    seg = hd.seg.segread(out / "seg_median.dcm")
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["IPH", "IVH"]
    for s in seg.SegmentSequence:
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == "50960005"  # hemorrhage
    vol = _seg_volume(seg, _ct_series(out), SliceGeometry.of(ct.affine, ct.shape))
    for n, kind in enumerate(("iph", "ivh")):
        same = int(np.count_nonzero(vol[..., n] == masks[kind]))
        assert same == masks[kind].size, f"{kind}: {masks[kind].size - same} voxels differ"


def test_binary_seg_world_positions(written) -> None:
    """Independent of the frame mapping: the SEG's own plane positions/orientation/spacing put every IPH
    pixel at the world point (RAS, x and y negated) of an IPH voxel of the NIfTI, and all of them."""
    out, ct, masks, _, _ = written
    seg = pydicom.dcmread(out / "seg_median.dcm")
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.asarray([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    dr, dc = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    found = []
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        if int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != 1:
            continue
        ipp = np.asarray([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        for r, c in np.argwhere(frame > 0):
            found.append(ipp + c * dc * iop[:3] + r * dr * iop[3:])
    ijk = np.argwhere(masks["iph"] > 0)
    ras = (ct.affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    expect = ras * [-1, -1, 1]
    got = np.asarray(found)
    assert len(got) == len(expect)
    key = lambda a: np.round(a, 3)[np.lexsort(np.round(a, 3).T[::-1])]  # noqa: E731
    assert np.allclose(key(got), key(expect), atol=1e-3)


def test_fractional_seg_matches_maps(written) -> None:
    out, ct, _, maps, _ = written
    seg = hd.seg.segread(out / "seg_probability.dcm")
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    assert seg.segmentation_fractional_type == hd.seg.SegmentationFractionalTypeValues.PROBABILITY
    assert int(seg.MaximumFractionalValue) == MAX_FRACTIONAL_VALUE
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["P(IPH)", "P(IVH)", "P(new hemorrhage)"]
    vol = _seg_volume(seg, _ct_series(out), SliceGeometry.of(ct.affine, ct.shape))
    err = max(float(np.abs(vol[..., n] - maps[kind]).max()) for n, kind in enumerate(MAP_KINDS))
    assert err <= 0.5 / MAX_FRACTIONAL_VALUE + 1e-6, f"max fractional error {err}"


def test_segs_reference_written_series(written) -> None:
    out, *_, info = written
    series = _ct_series(out)
    sop = {d.SOPInstanceUID for d in series}
    for name in ("seg_median.dcm", "seg_probability.dcm"):
        seg = pydicom.dcmread(out / name)
        ref = seg.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == series[0].SeriesInstanceUID == info["uids"]["ct_series"]
        refs = {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence}
        assert refs <= sop and refs
        assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
        assert seg.StudyInstanceUID == series[0].StudyInstanceUID
    assert set(info["uids"]["ct_instances"]) == sop


def test_no_phi_and_new_uids(written, tmp_path: Path) -> None:
    out, ct, masks, maps, info = written
    files = [*sorted((out / "ct").glob("*.dcm")), out / "seg_median.dcm", out / "seg_probability.dcm"]
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.PatientID == "P007" and str(ds.PatientName).rstrip("^") == "P007"
        assert SENTINEL.split("^")[0] not in f.read_bytes().decode("latin-1")
        for el in ds.iterall():
            if el.VR in ("DA", "DT") and el.value:
                assert el.keyword == "ContentDate" and el.value == "19000101", (f.name, el.keyword, el.value)
    again = write_dicom_outputs(tmp_path / DICOM_DIR, ct, masks, maps, "P007", {})
    first = [info["uids"][k] for k in ("study", "frame_of_reference", "ct_series")] + info["uids"]["ct_instances"]
    second = [again["uids"][k] for k in ("study", "frame_of_reference", "ct_series")] + again["uids"]["ct_instances"]
    assert not set(first) & set(second) and len(set(first)) == len(first)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporaries left


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not on PATH")
def test_dciodvfy_clean(written) -> None:
    out, *_ = written
    for f in (*sorted((out / "ct").glob("*.dcm")), out / "seg_median.dcm", out / "seg_probability.dcm"):
        run = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{f.name}: {errors}"


def test_dicom_output_setting() -> None:
    assert dicom_output_enabled("auto", "dicom") and not dicom_output_enabled("auto", "nifti")
    assert not dicom_output_enabled("auto", None)
    assert dicom_output_enabled(True, "nifti") and not dicom_output_enabled(False, "dicom")
    with pytest.raises(ValueError, match="dicom_output"):
        dicom_output_enabled("yes", "dicom")


def _table(totals: list[tuple[float, float]]) -> pd.DataFrame:
    rows = [{"patient_id": "P007", "variant": "2D-ice", "sample": k, "flag": 1, "flag_source": "oracle",
             "guidance_scale": 1.0, "iph_ml": i, "ivh_ml": v, "total_ml": i + v, "new_ml": 0.0, "expansion": 0,
             "baseline_iph_ml": 1.0, "baseline_total_ml": 1.0} for k, (i, v) in enumerate(totals)]
    return pd.DataFrame(rows, columns=list(VOLUME_COLUMNS))


def test_median_sample() -> None:
    assert median_sample(_table([(5, 0), (1, 0), (3, 1), (9, 0), (2, 0)])) == 2  # totals 5 1 4 9 2 -> 4
    assert median_sample(_table([(1, 0), (4, 0), (2, 0), (8, 0)])) == 2  # even count: the lower median (2)
    assert median_sample(_table([(2, 0), (2, 0), (2, 0)])) == 1  # equal totals: in sample order


def test_write_dicom_products_uses_median_native_sample(tmp_path: Path) -> None:
    """From a sample folder's native products: the binary SEG is the median sample's masks, the sidecar
    carries summary numbers, model facts and the UIDs."""
    ct, masks, maps = _arrays(1)
    native_ct = tmp_path / "bl_ct.nii.gz"
    save_nifti(ct, native_ct)
    out = tmp_path / "sample_set"
    table = _table([(1.0, 0.0), (6.0, 0.5), (3.0, 0.0)])  # median total 3.0 -> sample 2
    for k in range(3):
        for key in ("iph", "ivh"):
            data = masks[key] if k == 2 else np.roll(masks[key], k + 1, axis=0)
            save_nifti(make_image(data, ct.affine), out / f"native/sample_{k:02d}_{key}.nii.gz")
    for kind in MAP_KINDS:
        save_nifti(make_image(maps[kind], ct.affine), out / f"native/{kind}_prob.nii.gz")
    summary = {"patient_id": "P007", "variant": "2D-ice", "baseline_ml": {"iph": 1.0, "ivh": 0.0, "total": 1.0},
               "followup_ml": {"iph": {"median": 3.0, "interval_80": [1.0, 6.0]}}, "p_expansion": 1 / 3,
               "p_expansion_by_flag": {1: 1 / 3}, "p_ivh": 1 / 3, "n_samples": 3}
    files = write_dicom_products(out, table, summary, native_ct, {"config_hash": "abc123def456",
                                                                  "model": {"variant": "2D-ice"}})
    assert {"dicom/seg_median.dcm", "dicom/seg_probability.dcm", "dicom/dicom.json"} <= set(files)
    side = read_json(out / "dicom" / "dicom.json")
    assert side["median_sample"] == 2 and side["config_hash"] == "abc123def456"
    assert side["p_expansion"] == pytest.approx(1 / 3) and side["followup_ml"]["iph"]["interval_80"] == [1.0, 6.0]
    assert side["uids"]["seg_binary_instance"] == pydicom.dcmread(out / "dicom" / "seg_median.dcm").SOPInstanceUID
    seg = hd.seg.segread(out / "dicom" / "seg_median.dcm")
    vol = _seg_volume(seg, _ct_series(out / "dicom"), SliceGeometry.of(ct.affine, ct.shape))
    assert np.array_equal(vol[..., 0], masks["iph"]) and np.array_equal(vol[..., 1], masks["ivh"])


@pytest.fixture(scope="module")
def sampled_patient(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A results folder before ``hemexp sample`` (tiny models, one preprocessed test patient) plus the
    ingested baseline CT on the native grid and an ``ingest.json`` that says the CT was DICOM."""
    import json

    import yaml
    from test_sampling import CLINICAL, save_tiny_models, synthetic_baseline, write_patient_dir

    root = tmp_path_factory.mktemp("sample_dicom")
    results = root / "results"
    pdir = results / "preprocessed" / "D001"
    write_patient_dir(pdir, synthetic_baseline(shape=(16, 16, 10)))
    (pdir / "summary.json").write_text(json.dumps({"patient_id": "D001", "split": "test", "site": "D",
                                                   "expansion": True, "clinical": CLINICAL,
                                                   "volumes_ml": {"baseline": {"iph": 10.0, "ivh": 0.2, "total": 10.2}}}))
    native = read_json(pdir / "transforms" / "native_grid.json")
    ingested = results / "ingested" / "D001"
    rng = np.random.default_rng(3)
    save_nifti(make_image(rng.normal(30, 5, native["shape"]).astype(np.float32), np.asarray(native["affine"])),
               ingested / "bl_ct.nii.gz")
    (ingested / "ingest.json").write_text(json.dumps({"native": {"bl": {"source": {"format": "dicom"}}}}))
    save_tiny_models(results / "models", {"2D-ice": ("ice", 1)})
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["sampling"].update(n_samples=3, ddim_steps=2, chunk_size=8, z_margin_mm=3.0, flag_source=1)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root, ingested


def test_sample_stage_writes_dicom_for_dicom_input(sampled_patient) -> None:
    """``hemexp sample`` with ``dicom_output: auto`` and a DICOM-ingested baseline: ``dicom/`` appears,
    listed in summary.json, its binary SEG is the median sample's native masks, the sidecar carries the
    summary's P(HE)/P(IVH) and the config hash; a NIfTI-ingested baseline gets no ``dicom/``."""
    import json

    from hemexp.cli import main
    from hemexp.core.config import config_hash, load_config

    root, ingested = sampled_patient
    cfg_path = root / "config.yaml"
    assert main(["sample", "2D-ice", "D001", "--config", str(cfg_path)]) == 0
    out = root / "results" / "samples" / "2D-ice" / "D001"
    summary = read_json(out / "summary.json")
    side = read_json(out / "dicom" / "dicom.json")
    assert "dicom/seg_median.dcm" in summary["files"]["dicom"]
    assert side["p_expansion"] == summary["p_expansion"] and side["p_ivh"] == summary["p_ivh"]
    assert side["config_hash"] == config_hash(load_config(cfg_path)) and side["model"]["variant"] == "2D-ice"
    k = side["median_sample"]
    assert k == median_sample(pd.read_csv(out / "volumes.tsv", sep="\t"))
    ct = nib.load(str(ingested / "bl_ct.nii.gz"))
    vol = _seg_volume(hd.seg.segread(out / "dicom" / "seg_median.dcm"), _ct_series(out / "dicom"),
                      SliceGeometry.of(ct.affine, ct.shape))
    for n, key in enumerate(("iph", "ivh")):
        assert np.array_equal(vol[..., n], np.asarray(nib.load(str(out / f"native/sample_{k:02d}_{key}.nii.gz")).dataobj))
    (ingested / "ingest.json").write_text(json.dumps({"native": {"bl": {"source": {"format": "nifti"}}}}))
    assert main(["sample", "2D-ice", "D001", "--config", str(cfg_path)]) == 0
    assert not (out / "dicom").exists() and "dicom" not in read_json(out / "summary.json")["files"]


def test_simulate_writes_dicom_when_asked(tmp_path: Path) -> None:
    """``hemexp simulate`` with ``dicom_output: true`` (NIfTI input, so ``auto`` would be off): the CT
    series lies on the input CT's (canonical) grid and the SEGs reference it."""
    import yaml
    from test_pipeline import _template
    from test_register import _rotation, head_phantom
    from test_sampling import save_tiny_models

    from hemexp.cli import main

    ct, iph, ivh = head_phantom((3.0, 3.0, 4.0), _rotation(np.array([3, -4, 6])), (4, -3, 2), lesion_mm=14.0, ivh=True)
    for name, img in (("ct", ct), ("iph", iph), ("ivh", ivh)):
        nib.save(img, tmp_path / f"{name}.nii.gz")
    tmpl, tmask = _template(tmp_path)
    save_tiny_models(tmp_path / "models", {"2D-ice": ("ice", 1)})
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["preprocess"].update(skullstrip="builtin", spacing_mm=[6.0, 6.0, 6.0], crop=[32, 32], registration_mm=4.0)
    cfg["sampling"].update(ddim_steps=2, n_samples=3, z_margin_mm=6.0, dicom_output=True)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sim"
    argv = ["simulate", "--ct", tmp_path / "ct.nii.gz", "--iph", tmp_path / "iph.nii.gz", "--ivh", tmp_path / "ivh.nii.gz",
            "--clinical", "onset_to_ct_h=1.5", "age=77", "gcs=12", "sbp=190", "anticoagulant=0", "antiplatelet=0",
            "--variant", "2D-ice", "--flag", "1", "--template", tmpl, "--template-mask", tmask, "--models",
            tmp_path / "models", "--out", out, "--config", tmp_path / "c.yaml", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    side = read_json(out / "dicom" / "dicom.json")
    assert side["baseline_input_format"] == "nifti" and len(side["uids"]["ct_instances"]) == ct.shape[2]
    canon = nib.as_closest_canonical(ct)
    series = _ct_series(out / "dicom")
    assert np.allclose([float(v) for v in series[0].ImagePositionPatient],
                       SliceGeometry.of(canon.affine, canon.shape).positions[0], atol=1e-4)
    seg = pydicom.dcmread(out / "dicom" / "seg_probability.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
