"""One patient end to end through the CLI (ingest -> preprocess -> shard), the template builder, the
native-space round trip, and per-patient failures (bad input -> PatientInputError, recorded, no
partial output). The cohort is a tiny manifest cohort of posed phantom heads written as NIfTI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from test_register import _rotation, head_phantom

from hemexp.cli import main
from hemexp.cohort.manifest import IMAGE_COLUMNS
from hemexp.core.config import load_config
from hemexp.io.nifti import make_image

SPACING = (3.0, 3.0, 4.0)  # anisotropic native scans, like thick-slice clinical CT
CLINICAL = {"onset_to_ct_h": 2.0, "anticoagulant": 0, "antiplatelet": 1, "age": 70, "gcs": 12, "sbp": 170}


def _write_patient(raw: Path, pid: str, bl_pose, fu_pose, bl_mm: float, fu_mm: float) -> dict:
    """Raw NIfTI files of one patient; returns its manifest row (expansion column deliberately 0)."""
    row = {"patient_id": pid, "site": "A", "split": "train", "expansion": 0, "he_prob": ""}
    for name, (rot, shift), lesion, ivh in (("baseline", bl_pose, bl_mm, False), ("followup", fu_pose, fu_mm, True)):
        ct, iph, ivh_img = head_phantom(SPACING, rot, shift, lesion_mm=lesion, ivh=ivh)
        for kind, img in (("ct", ct), ("iph", iph), ("ivh", ivh_img)):
            path = raw / pid / f"{name}_{kind}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(img, path)
            row[f"{name}_{kind}"] = str(path.relative_to(raw))
    bl_iph = np.asarray(nib.load(raw / row["baseline_iph"]).dataobj)
    row["baseline_iph_ml"] = round(float(bl_iph.sum()) * np.prod(SPACING) / 1000.0, 2)
    return {**row, **CLINICAL}


def _template(out: Path) -> tuple[Path, Path]:
    """A skull-stripped phantom template (HU) + mask at 2 mm, unposed."""
    ct = head_phantom((2.0, 2.0, 2.0), lesion_mm=0.1)[0]
    data = np.asarray(ct.dataobj)
    brain = (data > -100) & (data < 100)
    paths = out / "template.nii.gz", out / "template_mask.nii.gz"
    nib.save(make_image(np.where(brain, data, 0).astype(np.float32), ct.affine), paths[0])
    nib.save(make_image(brain.astype(np.uint8), ct.affine), paths[1])
    return paths


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(config path, results dir, raw dir) of a 2-patient manifest cohort; P01 expands, P02 does not."""
    root = tmp_path_factory.mktemp("cohort")
    raw = root / "raw"
    rows = [
        _write_patient(raw, "P01", (_rotation(np.array([3, -4, 8])), (4, -6, 3)),
                       (_rotation(np.array([-5, 2, -3])), (-3, 5, -4)), 12.0, 17.0),
        _write_patient(raw, "P02", (_rotation(np.array([0, 5, -6])), (-2, 3, 6)),
                       (_rotation(np.array([2, 0, 4])), (5, -1, 2)), 11.0, 11.3),
    ]
    pd.DataFrame(rows).to_csv(raw / "manifest.tsv", sep="\t", index=False)
    tmpl, tmask = _template(root)
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    cfg["results_dir"] = str(root / "results")
    cfg["cohort"].update(source="manifest", manifest=str(raw / "manifest.tsv"))
    cfg["preprocess"].update(skullstrip="builtin", template=str(tmpl), template_mask=str(tmask), registration_mm=4.0)
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path, root / "results", raw


def _run(*argv) -> int:
    return main([str(a) for a in argv])


def test_one_patient_end_to_end(cohort):
    cfg_path, results, raw = cohort
    assert _run("ingest", "P01", "--config", cfg_path) == 0
    assert _run("preprocess", "P01", "--config", cfg_path) == 0
    assert _run("shard", "P01", "--config", cfg_path) == 0
    out = results / "preprocessed" / "P01"
    summary = json.loads((out / "summary.json").read_text())
    # the phantom's lesion radius grows 12 -> 17 mm: expansion by the paper rule, manifest says 0
    assert summary["expansion"] is True and summary["manifest_expansion"] is False
    assert any("disagrees with the manifest" in w for w in summary["warnings"])
    native, grid = summary["volumes_ml"], summary["volumes_ml_model_grid"]
    assert native["baseline"]["iph"] == pytest.approx(4 / 3 * np.pi * 1.2**3, rel=0.2)
    for tp in ("baseline", "followup"):
        assert grid[tp]["iph"] == pytest.approx(native[tp]["iph"], rel=0.15)
    assert native["followup"]["ivh"] > 0 and native["baseline"]["ivh"] == 0
    assert summary["registration"]["brain_dice"] > 0.9
    identity = summary["identity"]  # the same head: a near-rigid affine, numbers only
    assert all(isinstance(v, (int, float)) for v in identity.values()), identity
    assert all(abs(identity[f"scale_{a}"] - 1) < 0.02 for a in "xyz"), identity
    assert summary["grid"]["shape"][:2] == [64, 64] and summary["native_slice_thickness_mm"] == pytest.approx(4.0)
    assert {"ingest", "skullstrip", "rigid", "affine", "resample", "qc"} <= set(summary["timings_s"])
    for name in ("bl_ct", "fu_ct", "bl_iph", "fu_ivh", "brain_bl", "transforms/bl_to_template.mat",
                 "transforms/fu_to_bl.mat", "qc.png"):
        assert (out / (name if "." in name else f"{name}.nii.gz")).is_file(), name
    bl_ct = nib.load(out / "bl_ct.nii.gz")
    assert bl_ct.shape[:2] == (64, 64) and np.asarray(bl_ct.dataobj).max() > 50  # HU kept on disk
    # registered follow-up lesion overlaps the baseline lesion (same site, grown)
    bl_iph, fu_iph = (np.asarray(nib.load(out / f"{t}_iph.nii.gz").dataobj) > 0 for t in ("bl", "fu"))
    assert (bl_iph & fu_iph).sum() / bl_iph.sum() > 0.85
    assert (results / "shards" / "P01.parquet").is_file()


def test_to_native_round_trip(cohort):
    from hemexp.preprocess.register import to_native

    cfg_path, results, _ = cohort
    if not (results / "preprocessed" / "P01" / "summary.json").exists():
        assert _run("ingest", "P01", "--config", cfg_path) == 0
        assert _run("preprocess", "P01", "--config", cfg_path) == 0
    out = results / "preprocessed" / "P01"
    native = nib.load(results / "ingested" / "P01" / "bl_iph.nii.gz")
    back = to_native(nib.load(out / "bl_iph.nii.gz"), out, "label")
    assert back.shape == native.shape and np.allclose(back.affine, native.affine)
    assert back.get_data_dtype() == np.uint8
    a, b = np.asarray(back.dataobj) > 0, np.asarray(native.dataobj) > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8


def test_build_template_from_ingested_baselines(cohort, tmp_path):
    cfg_path, results, _ = cohort
    for pid in ("P01", "P02"):
        if not (results / "ingested" / pid / "ingest.json").exists():
            assert _run("ingest", pid, "--config", cfg_path) == 0
    cfg = load_config(cfg_path)
    cfg["preprocess"].update(template=None, template_mask=None)
    own = tmp_path / "config.yaml"
    own.write_text(yaml.safe_dump({**cfg, "results_dir": str(results)}))
    assert _run("build-template", "--patients", "P02", "P01", "--config", own) == 0
    tmpl = nib.load(results / "template" / "template.nii.gz")
    mask = np.asarray(nib.load(results / "template" / "template_mask.nii.gz").dataobj)
    volume = mask.sum() * np.prod(tmpl.header.get_zooms()[:3]) / 1000
    assert 900 < volume < 1500  # the phantom brain is ~1.1 L
    data = np.asarray(tmpl.dataobj)
    assert 15 < np.median(data[mask > 0]) < 45 and np.all(data[mask == 0] == 0)


def _bad_patient(cohort, pid: str, edit) -> tuple[Path, Path]:
    """Add patient ``pid`` (a copy of P02's files, then ``edit(row, raw)``) to a copy of the cohort."""
    cfg_path, results, raw = cohort
    df = pd.read_csv(raw / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    row = df[df["patient_id"] == "P02"].iloc[0].copy()
    row["patient_id"] = pid
    for column in IMAGE_COLUMNS:  # own copies: a manifest may not give two patients the same file
        copy = raw / f"{pid}_copy" / Path(row[column]).name
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(raw / row[column], copy)
        row[column] = str(copy.relative_to(raw))
    edit(row, raw)
    manifest = raw / f"manifest_{pid}.tsv"
    pd.concat([df, row.to_frame().T]).to_csv(manifest, sep="\t", index=False)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["cohort"]["manifest"] = str(manifest)
    own = raw.parent / f"config_{pid}.yaml"
    own.write_text(yaml.safe_dump(cfg))
    return own, results


def _empty_iph(row, raw):
    img = nib.load(raw / row["baseline_iph"])
    path = raw / "BADIPH_iph.nii.gz"
    nib.save(make_image(np.zeros(img.shape, np.uint8), img.affine), path)
    row["baseline_iph"] = path.name


def _missing_fu(row, raw):
    row["followup_ct"] = "NOFU/followup_ct.nii.gz"


def _geometry(row, raw):
    img = nib.load(raw / row["baseline_iph"])
    path = raw / "GEOM_iph.nii.gz"
    away = img.affine + np.array([[0, 0, 0, 500.0]] * 3 + [[0, 0, 0, 0]])  # outside the CT's field of view
    nib.save(make_image(np.asarray(img.dataobj)[:-3], away), path)
    row["baseline_iph"] = path.name


def _nan_ct(row, raw):
    img = nib.load(raw / row["baseline_ct"])
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[10:12, 10:12, 5] = np.nan
    path = raw / "NANCT_ct.nii.gz"
    nib.save(make_image(data, img.affine), path)
    row["baseline_ct"] = path.name


@pytest.mark.parametrize("pid, edit, file_part, problem", [
    ("BADIPH", _empty_iph, "BADIPH_iph.nii.gz", "baseline IPH mask is empty"),
    ("NOFU", _missing_fu, "NOFU/followup_ct.nii.gz", "not found"),
    ("GEOM", _geometry, "GEOM_iph.nii.gz", "does not match CT grid"),
    ("NANCT", _nan_ct, "NANCT_ct.nii.gz", "NaN"),
])
def test_bad_input_fails_one_patient(cohort, capsys, pid, edit, file_part, problem):
    cfg_path, results = _bad_patient(cohort, pid, edit)
    assert _run("ingest", pid, "--config", cfg_path) == 1
    err = capsys.readouterr().err
    assert f"patient {pid}" in err and file_part in err and problem in err, err
    assert not (results / "ingested" / pid).exists()  # no partial output
    assert not list((results / "ingested").glob(f".{pid}*"))  # no leftover temp folder
    assert _run("failures", "--results", results) == 0
    table = pd.read_csv(results / "qc" / "failures.tsv", sep="\t")
    hit = table[(table["patient_id"] == pid) & (table["stage"] == "ingest")]
    assert len(hit) == 1 and file_part in hit["file"].iloc[0] and problem in hit["problem"].iloc[0]


def test_failed_registration_check_leaves_no_output(cohort, capsys, tmp_path):
    """A preprocess-stage PatientInputError (brain Dice below the threshold) is recorded, names the
    follow-up scan, and leaves no preprocessed folder behind."""
    cfg_path, results, _ = cohort
    if not (results / "ingested" / "P02" / "ingest.json").exists():
        assert _run("ingest", "P02", "--config", cfg_path) == 0
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["preprocess"]["min_brain_dice"] = 0.9999
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(cfg))
    assert _run("preprocess", "P02", "--config", strict) == 1
    err = capsys.readouterr().err
    assert "patient P02" in err and "followup_ct.nii.gz" in err and "brain Dice" in err
    assert not (results / "preprocessed" / "P02").exists()
    assert not list((results / "preprocessed").glob(".P02*"))
    record = json.loads((results / "qc" / "failures" / "preprocess__P02.json").read_text())
    assert "min_brain_dice" in record["problem"]


def _wider_head(row, raw):
    """Another patient's follow-up: P02's follow-up scan of a head 8 % wider (voxel x spacing stretched)."""
    for column in ("followup_ct", "followup_iph", "followup_ivh"):
        img = nib.load(raw / row[column])
        aff = img.affine.copy()
        aff[:3, 0] *= 1.08
        nib.save(make_image(np.asarray(img.dataobj), aff), raw / row[column])


def test_another_patients_followup_fails_the_identity_check(cohort, capsys):
    """A follow-up of a head 8 % wider aligns (brain Dice passes) but needs an affine scale of ~1.08 on x."""
    cfg_path, results = _bad_patient(cohort, "WIDER", _wider_head)
    assert _run("ingest", "WIDER", "--config", cfg_path) == 0
    assert _run("preprocess", "WIDER", "--config", cfg_path) == 1
    err = capsys.readouterr().err
    assert "patient WIDER" in err and "followup_ct.nii.gz" in err, err
    assert "does not look like the same head" in err and "on x (allowed 0.97-1.03" in err, err
    scale = float(err.split("affine scale ")[1].split()[0])
    assert 1.06 < scale < 1.10, err
    assert not (results / "preprocessed" / "WIDER").exists()


@pytest.mark.parametrize("content", [None, "{not json", ""])
def test_read_summary_names_the_patient_file_and_stage_to_rerun(tmp_path, content):
    """Every later stage reads summary.json through one reader: missing or corrupt -> one clear error."""
    from hemexp.core.errors import PatientInputError
    from hemexp.preprocess.pipeline import read_summary

    if content is not None:
        (tmp_path / "summary.json").write_text(content)
    with pytest.raises(PatientInputError) as err:
        read_summary("P07", tmp_path)
    assert err.value.patient_id == "P07" and err.value.file.endswith("summary.json")
    assert "hemexp preprocess" in err.value.problem


def test_read_summary_returns_the_json(tmp_path):
    from hemexp.preprocess.pipeline import read_summary

    (tmp_path / "summary.json").write_text('{"expansion": true}')
    assert read_summary("P07", tmp_path) == {"expansion": True}
