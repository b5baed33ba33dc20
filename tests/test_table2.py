"""Table 2 assembly, copy-baseline from files, adherence and MLflow logging on constructed results."""

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from hemexp.core.errors import PatientInputError
from hemexp.core.files import write_json
from hemexp.core.tables import markdown_table
from hemexp.evaluation.table2 import (
    COPY_BASELINE,
    adherence_table,
    copy_baseline_row,
    log_variant_results,
    mean_sd_cell,
    method_order,
    metrics_from_files,
    patient_means,
    table2,
    table2_footnote,
    variant_metrics,
    write_table2,
)


def _row(method, pid, sample, expansion, iph_mae, assd=1.0, cov=0.5):
    return {"method": method, "patient_id": pid, "sample": sample, "expansion": expansion,
            "iph_mae": iph_mae, "iph_assd": assd, "iph_cov": cov, "iph_dice": 0.5,
            "total_mae": 2 * iph_mae, "total_assd": assd, "total_cov": cov, "total_dice": 0.5}


@pytest.fixture()
def fake_rows():
    rows = [
        # HemExp: two samples per patient; patient means 2, 4 (expanders) and 1 (non-expander)
        _row("2D-ice", "P1", 0, True, 1.0), _row("2D-ice", "P1", 1, True, 3.0),
        _row("2D-ice", "P2", 0, True, 4.0, assd=float("nan"), cov=0.0),
        _row("2D-ice", "P2", 1, True, 4.0, assd=3.0, cov=1.0),
        _row("2D-ice", "P3", 0, False, 1.0), _row("2D-ice", "P3", 1, False, 1.0),
        # deterministic copy baseline: one sample per patient
        _row(COPY_BASELINE, "P1", 0, True, 10.0), _row(COPY_BASELINE, "P2", 0, True, 20.0),
        _row(COPY_BASELINE, "P3", 0, False, 0.5),
    ]
    return pd.DataFrame(rows)


def test_mean_sd_cell_format():
    assert mean_sd_cell([2.0, 4.0]) == "3.00(1.4)"  # sd with ddof=1: sqrt(2)
    assert mean_sd_cell([12.91]) == "12.91(-)"
    assert mean_sd_cell([float("nan"), 1.0, 3.0]) == "2.00(1.4)"
    assert mean_sd_cell([]) == "-"


def test_patient_means_average_samples_and_count_undefined(fake_rows):
    pm = patient_means(fake_rows).set_index(["method", "patient_id"])
    assert pm.loc[("2D-ice", "P1"), "iph_mae"] == 2.0
    assert pm.loc[("2D-ice", "P2"), "iph_assd"] == 3.0  # NaN sample skipped
    assert pm.loc[("2D-ice", "P2"), "iph_cov"] == 0.5
    assert pm.loc[("2D-ice", "P2"), "n_iph_assd_undefined"] == 1
    assert pm.loc[("2D-ice", "P1"), "n_samples"] == 2
    assert pm.loc[(COPY_BASELINE, "P3"), "n_samples"] == 1


def test_table2_rows_and_cells(fake_rows):
    t = table2(patient_means(fake_rows))
    assert list(zip(t["group"], t["method"], strict=True)) == [
        ("Expansion", COPY_BASELINE), ("Expansion", "2D-ice"), ("Non-exp.", COPY_BASELINE), ("Non-exp.", "2D-ice")]
    exp_hemexp = t[(t["group"] == "Expansion") & (t["method"] == "2D-ice")].iloc[0]
    assert exp_hemexp["IPH MAE (mL)"] == "3.00(1.4)"  # patient means 2 and 4
    assert exp_hemexp["Total MAE (mL)"] == "6.00(2.8)"
    assert exp_hemexp["n_patients"] == 2
    copy_exp = t[(t["group"] == "Expansion") & (t["method"] == COPY_BASELINE)].iloc[0]
    assert copy_exp["IPH MAE (mL)"] == "15.00(7.1)"
    nonexp = t[(t["group"] == "Non-exp.") & (t["method"] == "2D-ice")].iloc[0]
    assert nonexp["IPH MAE (mL)"] == "1.00(-)"


def test_method_order_puts_baselines_first():
    assert method_order(["2D-ice", "nnUNet-3D", COPY_BASELINE, "2D-i", "2D-ice"]) == [
        COPY_BASELINE, "nnUNet-3D", "2D-ice", "2D-i"]


def test_conflicting_expansion_labels_are_rejected(fake_rows):
    bad = fake_rows.copy()
    bad.loc[1, "expansion"] = False
    with pytest.raises(ValueError, match="conflicting"):
        patient_means(bad)


def test_write_table2_and_footnote(tmp_path, fake_rows):
    pm = patient_means(fake_rows)
    note = table2_footnote(pm, n_samples=2)
    assert "2D-ice: IPH 1, Total 1" in note and "N=2" in note
    t = table2(pm)
    write_table2(t, tmp_path / "table2.csv", tmp_path / "table2.md", note)
    back = pd.read_csv(tmp_path / "table2.csv")
    assert back.shape == t.shape and back.iloc[0]["IPH MAE (mL)"] == t.iloc[0]["IPH MAE (mL)"]
    md = (tmp_path / "table2.md").read_text()
    assert md.count("\n|") == len(t) + 2 and note in md  # header, rule, rows
    assert markdown_table(t).splitlines()[1].count("---") == t.shape[1]


def _nifti(path, arr, spacing=(2.0, 2.0, 3.0)):
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))


def test_copy_baseline_row_from_preprocessed_files(tmp_path):
    shape = (12, 12, 8)
    bl = np.zeros(shape, np.uint8)
    bl[3:6, 3:6, 2:4] = 1  # 18 voxels
    fu = np.zeros(shape, np.uint8)
    fu[3:9, 3:6, 2:4] = 1  # 36 voxels, contains bl
    empty = np.zeros(shape, np.uint8)
    for name, arr in {"bl_iph": bl, "bl_ivh": empty, "fu_iph": fu, "fu_ivh": empty}.items():
        _nifti(tmp_path / f"{name}.nii.gz", arr)
    write_json(tmp_path / "summary.json", {"patient_id": "A001", "expansion": True})
    row = copy_baseline_row("A001", tmp_path)
    assert row["method"] == COPY_BASELINE and row["expansion"] is True
    assert row["iph_cov"] == pytest.approx(0.5)
    assert row["iph_mae"] == pytest.approx(18 * 12 / 1000)  # voxel volume 2*2*3 = 12 mm^3
    assert row["total_cov"] == pytest.approx(0.5)


def test_metrics_from_files_rejects_other_grid(tmp_path):
    a = np.ones((6, 6, 4), np.uint8)
    _nifti(tmp_path / "ref.nii.gz", a)
    _nifti(tmp_path / "pred.nii.gz", a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(PatientInputError, match="grid"):
        metrics_from_files("A001", tmp_path / "pred.nii.gz", tmp_path / "pred.nii.gz",
                           tmp_path / "ref.nii.gz", tmp_path / "ref.nii.gz")
    with pytest.raises(PatientInputError, match="predicted IPH mask file not found"):
        metrics_from_files("A001", tmp_path / "missing.nii.gz", tmp_path / "ref.nii.gz",
                           tmp_path / "ref.nii.gz", tmp_path / "ref.nii.gz")


def test_adherence_by_flag_and_source():
    # baseline 10 mL: expansion when the sample reaches 13.3 mL (33 %) or 16 mL
    samples = pd.DataFrame({
        "method": "2D-ice", "patient_id": ["P1", "P1", "P2", "P2", "P3", "P3"],
        "flag_source": ["oracle"] * 4 + ["classifier"] * 2,
        "requested_flag": [1, 1, 0, 0, 1, 1],
        "baseline_iph_ml": 10.0,
        "sample_iph_ml": [14.0, 11.0, 10.5, 20.0, 13.4, 13.2],
    })
    t = adherence_table(samples).set_index(["flag_source", "requested_flag"])
    assert t.loc[("oracle", "1"), "match_rate"] == 0.5
    assert t.loc[("oracle", "0"), "match_rate"] == 0.5
    assert t.loc[("oracle", "0"), "generated_expansion_rate"] == 0.5
    assert t.loc[("oracle", "all"), "match_rate"] == 0.5 and t.loc[("oracle", "all"), "n_samples"] == 4
    assert t.loc[("classifier", "1"), "match_rate"] == 0.5  # 13.4 expands, 13.2 does not
    assert t.loc[("classifier", "1"), "n_patients"] == 1


def test_variant_metrics_keys(fake_rows):
    m = variant_metrics(patient_means(fake_rows), "2D-ice")
    assert m["eval.expansion.iph_mae_mean"] == 3.0
    assert m["eval.expansion.iph_mae_sd"] == pytest.approx(math.sqrt(2))
    assert m["eval.non_expansion.n_patients"] == 1.0 and "eval.non_expansion.iph_mae_sd" not in m
    assert all(math.isfinite(v) for v in m.values())


def test_log_variant_results_lands_in_model_run(tmp_path):
    import mlflow

    cfg = {"results_dir": str(tmp_path), "tracking": {"experiment": "t", "uri": f"sqlite:///{tmp_path}/m.db"}}
    with pytest.raises(FileNotFoundError, match="2D-ice"):
        log_variant_results(cfg, "2D-ice", {"x": 1.0})
    mlflow.set_tracking_uri(cfg["tracking"]["uri"])
    mlflow.set_experiment("t")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    run_dir = tmp_path / "models" / "diffusion" / "2D-ice"
    run_dir.mkdir(parents=True)
    (run_dir / "mlflow_run_id.txt").write_text(run_id)
    log_variant_results(cfg, "2D-ice", {"eval.all.iph_mae_mean": 2.5})
    assert mlflow.get_run(run_id).data.metrics["eval.all.iph_mae_mean"] == 2.5
