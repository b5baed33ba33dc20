"""De-identification sentinel test (docs/deidentification.md).

A tiny manifest cohort whose DICOM headers carry a sentinel in every text-valued tag (patient, study,
equipment, free text, dates, UIDs) and whose folders above the manifest carry a sentinel name goes
through ``ingest``, ``preprocess``, ``shard``, two failing patients, a broken manifest and ``hemexp
failures``; no sentinel may appear in any file under ``results_dir`` (bytes, decompressed ``.nii.gz``,
NIfTI text header fields), in stdout/stderr or in the log records. Plus unit checks of
:mod:`hemexp.core.deid`.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from test_register import head_phantom

from hemexp.cli import main
from hemexp.cohort.synth.dicom_writer import write_dicom_series
from hemexp.core.deid import (
    DICOM_OUTPUT_ATTRIBUTES,
    DICOM_READ_ATTRIBUTES,
    kernel_code,
    modality_term,
    scrub_text,
    shareable_path,
    standard_uid,
)
from hemexp.io.nifti import make_image

NAME = "SENTINEL_NAME_4711"  # long text VRs (LO, PN, LT, ST, UT)
SHORT = "SNTL4711"  # 16-character VRs (SH, CS)
DATE, TIME = "19411203", "235917.4711"
FOLDER = "SENTINEL_FOLDER_Doe_John"  # a folder above the manifest, as a site's export path would be
SPACING = (6.25, 7.2, 6.0)  # 32 x 32 x 32 native voxels over the phantom's field of view
CLINICAL = {"onset_to_ct_h": 2.0, "anticoagulant": 0, "antiplatelet": 1, "age": 70, "gcs": 12, "sbp": 170}

# Every text-valued attribute a site's CT could carry: Annex E's patient, study, equipment and
# free-text attributes, with values of each VR's form.
PERSONAL_TAGS = {
    "PatientName": NAME, "PatientID": NAME, "IssuerOfPatientID": NAME, "OtherPatientNames": NAME,
    "PatientBirthDate": DATE, "PatientBirthTime": TIME, "PatientSex": "O", "PatientAge": "071Y",
    "PatientAddress": NAME, "PatientComments": NAME, "PatientMotherBirthName": NAME,
    "EthnicGroup": SHORT, "MilitaryRank": NAME, "Occupation": SHORT, "AdditionalPatientHistory": NAME,
    "StudyDate": DATE, "SeriesDate": DATE, "AcquisitionDate": DATE, "ContentDate": DATE,
    "StudyTime": TIME, "SeriesTime": TIME, "AcquisitionTime": TIME, "ContentTime": TIME,
    "AccessionNumber": SHORT, "StudyID": SHORT, "StudyDescription": NAME, "SeriesDescription": NAME,
    "ProtocolName": NAME, "ImageComments": NAME, "RequestedProcedureDescription": NAME,
    "PerformedProcedureStepDescription": NAME, "PerformedProcedureStepID": SHORT,
    "ReasonForStudy": NAME, "RequestingPhysician": NAME, "AdmittingDiagnosesDescription": NAME,
    "InstitutionName": NAME, "InstitutionAddress": NAME, "InstitutionalDepartmentName": NAME,
    "ReferringPhysicianName": NAME, "PerformingPhysicianName": NAME, "NameOfPhysiciansReadingStudy": NAME,
    "OperatorsName": NAME, "PhysiciansOfRecord": NAME, "StationName": SHORT, "DeviceSerialNumber": NAME,
    "Manufacturer": NAME, "ManufacturerModelName": NAME, "SoftwareVersions": NAME,
    "BodyPartExamined": SHORT, "ConvolutionKernel": SHORT, "PatientIdentityRemoved": "NO",
    "DerivationDescription": NAME, "AcquisitionDeviceProcessingDescription": NAME, "FilterType": SHORT,
}


def _uids(folder: Path) -> set[str]:
    ds = pydicom.dcmread(next(folder.iterdir()))
    return {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.FrameOfReferenceUID), str(ds.SOPInstanceUID)}


def _write_ct(ct: nib.Nifti1Image, folder: Path, seed: str) -> set[str]:
    """The CT as a DICOM series with every sentinel, plus two stacks that are rejected (a non-CT
    modality and a non-standard SOP class) in the same folder; returns the UIDs written."""
    vol = np.asarray(ct.dataobj, dtype=np.float32)
    write_dicom_series(vol, ct.affine, folder, NAME, NAME, series_number=3, uid_seed=seed, kernel=SHORT,
                       extra_tags=PERSONAL_TAGS)
    uids = _uids(folder)
    for k, extra in enumerate(({"Modality": SHORT}, {"SOPClassUID": "1.2.826.0.1.3680043.4711.1"}), start=1):
        sub = folder / f"other{k}"
        write_dicom_series(vol[:, :, :4], ct.affine, sub, NAME, NAME, series_number=90 + k, uid_seed=f"{seed}/{k}",
                           kernel=SHORT, extra_tags={**PERSONAL_TAGS, **extra})
        uids |= _uids(sub)
    return uids


def _mask(img: nib.Nifti1Image, path: Path) -> None:
    """A mask with sentinel text in every NIfTI text field and a header extension."""
    out = nib.Nifti1Image(np.asarray(img.dataobj, np.uint8), img.affine)
    out.header["descrip"], out.header["aux_file"] = NAME.encode(), NAME.encode()
    out.header["intent_name"], out.header["db_name"] = SHORT.encode(), SHORT.encode()
    out.header.extensions.append(nib.nifti1.Nifti1Extension("comment", NAME.encode()))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(config, results, data dir, sentinels): P01 good (DICOM CT), P02 a mask outside the CT's field
    of view, stored outside the manifest's folder."""
    root = tmp_path_factory.mktemp("deid") / FOLDER
    data, results = root / "study", root / "results"
    sentinels = {NAME, SHORT, DATE, TIME, FOLDER, "Doe_John", "1.2.826.0.1.3680043.4711.1"}
    rows = []
    for pid, lesions in (("P01", (12.0, 17.0)), ("P02", (12.0, 12.5))):
        row = {"patient_id": pid, "site": "A", "split": "train", "expansion": "", "he_prob": ""}
        for name, lesion, ivh in (("baseline", lesions[0], False), ("followup", lesions[1], True)):
            ct, iph, ivh_img = head_phantom(SPACING, lesion_mm=lesion, ivh=ivh)
            sentinels |= _write_ct(ct, data / pid / f"{name}_ct", f"{pid}/{name}")
            for kind, img in (("iph", iph), ("ivh", ivh_img)):
                _mask(img, data / pid / f"{name}_{kind}.nii.gz")
            row.update({f"{name}_{k}": f"{pid}/{name}_{k}" + ("" if k == "ct" else ".nii.gz")
                        for k in ("ct", "iph", "ivh")})
        iph = np.asarray(nib.load(data / pid / "baseline_iph.nii.gz").dataobj)
        rows.append({**row, "baseline_iph_ml": round(float(iph.sum()) * np.prod(SPACING) / 1000, 2), **CLINICAL})
    # P02's baseline IPH: placed 500 mm away (outside the CT's field of view), kept in a folder beside
    # (not below) the manifest's
    bad = root / "elsewhere" / "P02_iph.nii.gz"
    img = nib.load(data / "P02" / "baseline_iph.nii.gz")
    moved = img.affine.copy()
    moved[0, 3] += 500.0
    _mask(make_image(np.asarray(img.dataobj), moved), bad)
    rows[1]["baseline_iph"] = "../elsewhere/P02_iph.nii.gz"
    pd.DataFrame(rows).to_csv(data / "manifest.tsv", sep="\t", index=False)
    pd.DataFrame([{**rows[0], "followup_ct": "P01/missing_ct"}]).to_csv(data / "broken.tsv", sep="\t", index=False)
    tmpl = head_phantom((4.0, 4.0, 4.0), lesion_mm=0.1)[0]
    t = np.asarray(tmpl.dataobj)
    brain = (t > -100) & (t < 100)
    (root / "template").mkdir()
    nib.save(make_image(np.where(brain, t, 0).astype(np.float32), tmpl.affine), root / "template" / "template.nii.gz")
    nib.save(make_image(brain.astype(np.uint8), tmpl.affine), root / "template" / "template_mask.nii.gz")
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["cohort"].update(source="manifest", manifest=str(data / "manifest.tsv"))
    cfg["preprocess"].update(skullstrip="builtin", template=str(root / "template" / "template.nii.gz"),
                             template_mask=str(root / "template" / "template_mask.nii.gz"), registration_mm=6.0,
                             spacing_mm=[6.0, 6.0, 6.0], crop=[32, 32], min_brain_dice=0.5)
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path, results, data, sentinels


def _leaks(blob: bytes, sentinels: set[str]) -> set[str]:
    low = blob.lower()
    return {s for s in sentinels if s.lower().encode() in low}


def _file_texts(path: Path) -> list[bytes]:
    """The bytes of a product as a reader could see them: raw, decompressed, NIfTI text fields."""
    raw = path.read_bytes()
    out = [raw]
    if path.name.endswith(".gz"):
        out.append(gzip.decompress(raw))
    if path.name.endswith((".nii", ".nii.gz")):
        hdr = nib.load(path).header
        out += [bytes(hdr[f].item()) for f in ("descrip", "aux_file", "intent_name", "db_name")]
        assert not hdr.extensions, f"{path}: NIfTI header extension written"
    return out


def _json_paths(value, where: str = "") -> list[tuple[str, str]]:
    """Every string value of a JSON document that looks like a path, with where it is."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _json_paths(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _json_paths(v, f"{where}[{i}]")]
    return [(where, value)] if isinstance(value, str) and ("/" in value or "\\" in value) else []


def test_no_sentinel_leaves_the_pipeline(cohort, capsys, caplog):
    cfg_path, results, data, sentinels = cohort
    caplog.set_level(logging.DEBUG)
    run = lambda *argv: main([str(a) for a in argv])  # noqa: E731
    assert run("ingest", "P01", "--config", cfg_path) == 0
    assert run("preprocess", "P01", "--config", cfg_path) == 0
    assert run("shard", "P01", "--config", cfg_path) == 0
    assert run("ingest", "P02", "--config", cfg_path) == 1  # IPH mask outside the field of view
    assert run("ingest", "P99", "--config", cfg_path) == 1  # not in the manifest
    assert run("validate-manifest", data / "broken.tsv") == 2  # a missing file
    assert run("failures", "--results", results) == 0
    out = capsys.readouterr()

    # the failures are reported usefully: manifest-relative or file-name paths
    table = pd.read_csv(results / "qc" / "failures.tsv", sep="\t", keep_default_na=False).set_index("patient_id")
    assert table.loc["P02", "file"] == "P02_iph.nii.gz"  # outside the manifest's folder: name only
    assert "CT file: P02/baseline_ct" in table.loc["P02", "problem"]
    assert table.loc["P99", "file"] == "manifest.tsv"
    assert "file P02_iph.nii.gz" in out.err and "P01/missing_ct" in out.err
    assert all(not os.path.isabs(f) for f in table["file"])

    seen = {"stdout": out.out.encode(), "stderr": out.err.encode(), "log records": caplog.text.encode()}
    files = sorted(p for p in results.rglob("*") if p.is_file())
    assert {"ingest.json", "summary.json", "failures.tsv", "P01.parquet", "bl_ct.nii.gz", "qc.png"} <= {
        p.name for p in files}
    for path in files:
        for k, blob in enumerate(_file_texts(path)):
            seen[f"{path.relative_to(results)}#{k}"] = blob
    leaks = {where: _leaks(blob, sentinels) for where, blob in seen.items()}
    assert not {k: v for k, v in leaks.items() if v}, "sentinels leaked"
    assert str(results.parent) not in out.err + out.out + caplog.text  # no absolute path above the manifest

    for name in ("ingested/P01/ingest.json", "preprocessed/P01/summary.json", "qc/failures/ingest__P02.json"):
        doc = json.loads((results / name).read_text())
        absolute = [(w, v) for w, v in _json_paths(doc) if os.path.isabs(v) or v.startswith("..")]
        assert not absolute, f"{name}: absolute paths {absolute}"
    summary = json.loads((results / "preprocessed/P01/summary.json").read_text())
    assert summary["registration"]["template"] == "template.nii.gz"
    source = json.loads((results / "ingested/P01/ingest.json").read_text())["native"]["bl"]["source"]
    assert source["format"] == "dicom" and source["series_number"] == 3 and source["kernel"] == "other"
    assert "series_description" not in source and sum(source["not_chosen"].values()) == 2


def test_shareable_path_and_scrub_text(tmp_path):
    manifest_dir, results = tmp_path / FOLDER / "data", tmp_path / FOLDER / "data" / "results"
    assert shareable_path(manifest_dir / "P01" / "ct", manifest_dir, results) == "P01/ct"
    assert shareable_path(results / "ingested" / "P01", manifest_dir, results) == "ingested/P01"  # deeper root
    assert shareable_path(tmp_path / FOLDER / "x.nii.gz", manifest_dir, results) == "x.nii.gz"
    assert shareable_path(manifest_dir / ".." / "y.nii.gz", manifest_dir) == "y.nii.gz"  # above: name only
    assert shareable_path(None) == "" and shareable_path("C:\\Users\\Doe\\scan.nii", manifest_dir) == "scan.nii"
    text = (f"IPH mask on another grid; CT file: {manifest_dir}/P01/baseline ct; see "
            f"{results}/qc/x.json and '/srv/{FOLDER}/t.nii.gz', 3 mm/s")
    assert scrub_text(text, manifest_dir, results) == (
        "IPH mask on another grid; CT file: P01/baseline ct; see qc/x.json and 't.nii.gz', 3 mm/s")
    if os.name == "posix":
        link = tmp_path / "link"
        link.symlink_to(manifest_dir.parent, target_is_directory=True)
        assert shareable_path(link / "data" / "P01" / "ct", manifest_dir) == "P01/ct"  # resolved spelling


def test_dicom_value_whitelist():
    assert modality_term("ct") == "CT" and modality_term(SHORT) == "OTHER" and modality_term(None) == ""
    assert [kernel_code(k) for k in ("H30s", "Br40d", "FC43", "UB", "STANDARD", ["Hr38", "3"], "")] == [
        "H30s", "Br40d", "FC43", "UB", "STANDARD", "Hr38\\3", ""]
    assert kernel_code(SHORT) == kernel_code("Doe^John") == kernel_code("HEAD 5mm JD") == "other"
    assert standard_uid("1.2.840.10008.5.1.4.1.1.7") == "1.2.840.10008.5.1.4.1.1.7"
    assert standard_uid("1.2.826.0.1.3680043.4711") == standard_uid(NAME) == "a non-standard UID"


def test_dicom_reader_parses_only_the_documented_attributes():
    from hemexp.io.dicom import HEADER_TAGS

    assert set(HEADER_TAGS) <= set(DICOM_READ_ATTRIBUTES), set(HEADER_TAGS) - set(DICOM_READ_ATTRIBUTES)
    assert DICOM_OUTPUT_ATTRIBUTES <= set(DICOM_READ_ATTRIBUTES)
    never = {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "SeriesDescription",
             "ProtocolName", "ImageComments", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate"}
    assert not never & DICOM_OUTPUT_ATTRIBUTES
