"""Manifest validation reports every bad row at once, naming row, patient and column."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hemexp.cli import main
from hemexp.cohort.manifest import IMAGE_COLUMNS, read_manifest
from hemexp.core.clinical import CLINICAL_NAMES, clinical_vector, is_expansion, mask_volume_ml
from hemexp.core.errors import ManifestError


def _row(pid: str, split: str = "train", **over) -> dict:
    row = {"patient_id": pid, "site": "A", "split": split,
           **{c: f"{pid}/{c}.nii.gz" for c in IMAGE_COLUMNS},
           "onset_to_ct_h": "2", "baseline_iph_ml": "12.5", "anticoagulant": "0", "antiplatelet": "1",
           "age": "71", "gcs": "14", "sbp": "180", "expansion": "0", "he_prob": ""}
    row.update(over)
    return row


def _write(tmp_path: Path, rows: list[dict], make_files: bool = True) -> Path:
    for r in rows:
        for c in IMAGE_COLUMNS:
            if make_files and r[c]:
                f = tmp_path / r[c]
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(b"x")
    path = tmp_path / "manifest.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_valid_manifest_is_typed_and_resolved(tmp_path):
    path = _write(tmp_path, [_row("P2", "test"), _row("P1")])
    df = read_manifest(path)
    assert list(df["patient_id"]) == ["P1", "P2"]
    assert df["age"].dtype == float and Path(df.loc[0, "baseline_ct"]).is_absolute()
    assert np.isnan(df.loc[0, "he_prob"])


def test_every_bad_row_is_reported_at_once(tmp_path):
    rows = [
        _row("P1"),
        _row("P1"),  # duplicate
        _row("P3", split="validation"),  # unknown split
        _row("P4", gcs="2"),  # out of range
        _row("P5", age=""),  # missing
        _row("P6", sbp="high"),  # not a number
        _row("P7", anticoagulant="0.5"),  # not binary
        _row("P8", he_prob="1.7"),
        _row("P9"),
    ]
    path = _write(tmp_path, rows)
    (tmp_path / "P9" / "followup_ct.nii.gz").unlink()  # missing file
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "row 2 (patient P1), column patient_id: duplicate ID 'P1'" in text
    assert "row 3 (patient P1), column patient_id: duplicate ID 'P1'" in text
    assert "row 4 (patient P3), column split: 'validation' is not a known split" in text
    assert "row 5 (patient P4), column gcs: 2 out of range [3, 15]" in text
    assert "row 6 (patient P5), column age: missing value" in text
    assert "row 7 (patient P6), column sbp: 'high' is not a number" in text
    assert "row 8 (patient P7), column anticoagulant: '0.5' must be 0 or 1" in text
    assert "row 9 (patient P8), column he_prob" in text
    assert "row 10 (patient P9), column followup_ct: file not found" in text
    assert len(problems) == 9


def test_missing_columns(tmp_path):
    path = tmp_path / "m.tsv"
    pd.DataFrame([{"patient_id": "P1", "site": "A"}]).to_csv(path, sep="\t", index=False)
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(path)


def test_cli_exit_code_and_message(tmp_path, capsys):
    path = _write(tmp_path, [_row("P1", gcs="20")])
    assert main(["validate-manifest", str(path)]) == 2
    assert "patient P1), column gcs" in capsys.readouterr().err
    ok = _write(tmp_path, [_row("P1")])
    out = tmp_path / "check.json"
    assert main(["validate-manifest", str(ok), "--out", str(out)]) == 0 and out.exists()


@pytest.mark.parametrize(("bl", "fu", "expected"), [
    (10.0, 13.3, True),  # +33 %
    (10.0, 13.2, False),
    (30.0, 36.0, True),  # +6 mL
    (30.0, 35.9, False),
    (0.0, 5.0, False),  # empty baseline: only the absolute rule applies
    (0.0, 6.0, True),
    (20.0, 10.0, False),
])
def test_expansion_rule(bl, fu, expected):
    assert is_expansion(bl, fu) is expected


def test_clinical_vector_clamps_and_scales():
    row = dict(zip(CLINICAL_NAMES, [30.0, 125.0, 1, 0, 50.0, 3.0, 300.0], strict=True))
    np.testing.assert_allclose(clinical_vector(row), [1.0, 0.5, 1.0, 0.0, 0.5, 0.0, 1.0])


def test_mask_volume_of_analytic_box():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:12, 2:7, 2:6] = 1  # 10 x 5 x 4 voxels of 0.5 x 1 x 2.5 mm = 250 mm^3
    assert mask_volume_ml(mask, (0.5, 1.0, 2.5)) == pytest.approx(0.25)
