"""`hemexp evaluate` on a tiny fake result tree: hand-built sample masks and references whose metrics
are known, read through the command into Table 2, adherence, calibration and the PIT figure.
Also: the rules' report() annotations and captions parse (snakemake --lint)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from hemexp.cli import main
from hemexp.core.config import ConfigError, validate_config
from hemexp.core.errors import PatientInputError
from hemexp.core.files import write_json
from hemexp.evaluation.collect import sample_passes
from hemexp.sampling.flags import flag_source_passes

REPO = Path(__file__).resolve().parent.parent
SHAPE = (6, 6, 4)
AFFINE = np.diag([10.0, 10.0, 10.0, 1.0])  # 1 voxel = 1 mL, so volumes are voxel counts


def _default_cfg(results: Path) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["sampling"]["variants"] = ["2D-ice", "2D-i"]
    cfg["sampling"]["n_samples"] = 2
    cfg["baselines"] = ["copy", "nnunet_3d"]
    cfg["evaluation"]["flag_source_passes"] = {"classifier": ["2D-ice"]}
    validate_config(cfg)
    return cfg


def _mask(n_voxels: int, start: int = 0) -> np.ndarray:
    """``n_voxels`` set voxels in C order from flat index ``start`` (a compact block on this grid)."""
    m = np.zeros(int(np.prod(SHAPE)), np.uint8)
    m[start:start + n_voxels] = 1
    return m.reshape(SHAPE)


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))


def _patient(results: Path, pid: str, bl: int, fu: int, expansion: bool) -> None:
    d = results / "preprocessed" / pid
    _save(d / "bl_iph.nii.gz", _mask(bl))
    _save(d / "fu_iph.nii.gz", _mask(fu))
    for x in ("bl", "fu"):
        _save(d / f"{x}_ivh.nii.gz", np.zeros(SHAPE, np.uint8))
    write_json(d / "summary.json", {"patient_id": pid, "expansion": expansion})


def _samples(folder: Path, pid: str, iph_voxels: list[int], flags: list[int], source: str, bl: int) -> None:
    rows = []
    for k, (n, f) in enumerate(zip(iph_voxels, flags, strict=True)):
        _save(folder / "samples" / f"sample_{k:02d}_iph.nii.gz", _mask(n))
        _save(folder / "samples" / f"sample_{k:02d}_ivh.nii.gz", np.zeros(SHAPE, np.uint8))
        rows.append({"patient_id": pid, "sample": k, "flag": f, "flag_source": source, "iph_ml": float(n),
                     "ivh_ml": 0.0, "total_ml": float(n), "baseline_iph_ml": float(bl)})
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "volumes.tsv", sep="\t", index=False)
    write_json(folder / "summary.json", {"patient_id": pid})


@pytest.fixture()
def tree(tmp_path):
    """P1 expands 10 -> 20 mL, P2 is stable at 10 mL. Samples are prefixes of the same flat order,
    so MAE = |n - ref| and COV = min(n, ref) / ref exactly."""
    results = tmp_path / "results"
    cfg = _default_cfg(results)
    _patient(results, "P1", 10, 20, True)
    _patient(results, "P2", 10, 10, False)
    # 2D-ice (oracle): P1 samples 20 and 16 mL (flag 1); P2 samples 10 and 12 mL (flag 0)
    _samples(results / "samples" / "2D-ice" / "P1", "P1", [20, 16], [1, 1], "oracle", 10)
    _samples(results / "samples" / "2D-ice" / "P2", "P2", [10, 12], [0, 0], "oracle", 10)
    # 2D-i: never grows
    _samples(results / "samples" / "2D-i" / "P1", "P1", [10, 10], [1, 1], "oracle", 10)
    _samples(results / "samples" / "2D-i" / "P2", "P2", [10, 10], [0, 0], "oracle", 10)
    # classifier flag: P2 gets one flag-1 sample that expands (10 -> 18 mL)
    _samples(results / "samples_classifier" / "2D-ice" / "P1", "P1", [20, 20], [1, 1], "classifier", 10)
    _samples(results / "samples_classifier" / "2D-ice" / "P2", "P2", [18, 10], [1, 0], "classifier", 10)
    # nnU-Net only for P1 (missing predictions leave the patient out of that row)
    _save(results / "baselines" / "nnunet_3d" / "P1" / "iph.nii.gz", _mask(14))
    _save(results / "baselines" / "nnunet_3d" / "P1" / "ivh.nii.gz", np.zeros(SHAPE, np.uint8))
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return results, cfg_path


def _evaluate(cfg_path: Path) -> int:
    return main(["evaluate", "--patients", "P1", "P2", "--no-mlflow", "--config", str(cfg_path)])


def test_table2_from_fake_tree(tree):
    results, cfg_path = tree
    assert _evaluate(cfg_path) == 0
    m = results / "metrics"
    per_sample = pd.read_csv(m / "metrics_per_sample.csv")
    # copy 2 + nnU-Net 1 + three passes x 2 patients x 2 samples
    assert len(per_sample) == 2 + 1 + 12
    t = pd.read_csv(m / "table2.csv").set_index(["group", "method"])
    assert list(t.index) == [("Expansion", "copy-baseline"), ("Expansion", "nnUNet-3D"), ("Expansion", "2D-ice"),
                             ("Expansion", "2D-i"), ("Expansion", "2D-ice (classifier flag)"),
                             ("Non-exp.", "copy-baseline"), ("Non-exp.", "2D-ice"), ("Non-exp.", "2D-i"),
                             ("Non-exp.", "2D-ice (classifier flag)")]
    assert t.loc[("Expansion", "copy-baseline"), "IPH MAE (mL)"] == "10.00(-)"
    assert t.loc[("Expansion", "nnUNet-3D"), "IPH MAE (mL)"] == "6.00(-)"
    assert t.loc[("Expansion", "2D-ice"), "IPH MAE (mL)"] == "2.00(-)"  # mean of |20-20|, |16-20|
    assert t.loc[("Expansion", "2D-ice"), "IPH COV"] == "0.90(-)"  # mean of 1.0 and 0.8
    assert t.loc[("Non-exp.", "2D-ice (classifier flag)"), "IPH MAE (mL)"] == "4.00(-)"  # |18-10|, 0
    numbers = json.loads((m / "table2.json").read_text())
    assert numbers["2D-ice.expansion.iph_mae_mean"] == pytest.approx(2.0)
    assert numbers["2D-ice_classifier_flag.non_expansion.iph_mae_mean"] == pytest.approx(4.0)
    assert numbers["n_test_patients"] == 2
    assert all(isinstance(v, float) for v in numbers.values())
    md = (m / "table2.md").read_text()
    assert "2D-ice (classifier flag): flag from classifier" in md and "Empty masks" in md
    assert "<table" in (m / "table2.html").read_text()


def test_adherence_and_calibration_from_fake_tree(tree):
    results, cfg_path = tree
    assert _evaluate(cfg_path) == 0
    m = results / "metrics"
    adh = pd.read_csv(m / "adherence.csv", dtype={"stratum": str})
    row = adh[(adh["method"] == "2D-ice") & (adh["stratified_by"] == "requested_flag") & (adh["stratum"] == "all")]
    # P1: 20 mL expands (+10), 16 mL expands (+6, >= 6 mL); P2: 10 and 12 mL do not (+2 < 6 mL, 20 % < 33 %)
    assert row["match_rate"].item() == 1.0
    clf = adh[(adh["method"] == "2D-ice (classifier flag)") & (adh["stratified_by"] == "true_expansion")
              & (adh["stratum"] == "False")]
    assert clf["generated_expansion_rate"].item() == 0.5  # the non-expander's flag-1 sample expanded
    no_flag = adh[(adh["method"] == "2D-i") & (adh["stratified_by"] == "requested_flag") & (adh["stratum"] == "1")]
    assert not no_flag["flag_conditioned"].item() and no_flag["match_rate"].item() == 0.0
    cal = pd.read_csv(m / "calibration.csv").set_index(["method", "level"])
    # N=2: the 50 % and 80 % intervals are both the [min, max] hull; truth inside for 2D-ice
    # (P1 20 in [16, 20], P2 10 in [10, 12]), never for 2D-i on P1 (20 outside [10, 10])
    assert cal.loc[("2D-ice", 0.8), "observed"] == 1.0
    assert cal.loc[("2D-i", 0.8), "n_inside"] == 1
    assert cal.loc[("2D-ice", 0.8), "expected_calibrated"] == pytest.approx(1 / 3)  # (k - j)/(N + 1)
    cj = json.loads((m / "calibration.json").read_text())
    assert [cj[f"2D-ice.pit_rank_{i}"] for i in range(3)] == [0.0, 1.0, 1.0]  # both truths tie a sample; seeded tie-breaks
    assert all(isinstance(v, float) for v in cj.values())
    assert "NOT the nominal level" in (m / "calibration.md").read_text()
    assert (results / "figures" / "pit.png").stat().st_size > 1000


def test_bad_sample_grid_fails_naming_patient(tree, capsys):
    results, cfg_path = tree
    bad = results / "samples" / "2D-i" / "P2" / "samples" / "sample_01_iph.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 4), np.uint8), AFFINE), str(bad))
    assert _evaluate(cfg_path) == 1
    err = capsys.readouterr().err
    assert "patient P2" in err and "sample_01_iph" in err
    assert (results / "qc" / "failures" / "evaluate__P2.json").exists()
    assert not (results / "metrics" / "table2.csv").exists()  # no partial table


def test_flag_source_passes_checks_config(tmp_path):
    cfg = _default_cfg(tmp_path)
    assert [p.method for p in sample_passes(cfg)] == ["2D-ice", "2D-i", "2D-ice (classifier flag)"]
    # which variants a pass may name is a config rule: the validator reports it (tests/test_config.py)
    cfg["evaluation"]["flag_source_passes"] = {"classifier": ["2D-i"]}
    with pytest.raises(ConfigError, match="flag_source_passes.classifier: variant '2D-i' is not flag-conditioned"):
        validate_config(cfg)
    cfg["evaluation"]["flag_source_passes"] = {"classifier": ["2.5D3-ice"]}
    with pytest.raises(ConfigError, match="not a sampled variant"):
        validate_config(cfg)
    cfg["evaluation"]["flag_source_passes"] = {"oracle": ["2D-ice"]}  # same as the main pass: dropped
    assert flag_source_passes(cfg) == {}


def test_missing_volume_column_is_a_patient_error(tree):
    results, _ = tree
    from hemexp.evaluation.collect import read_volumes

    path = results / "samples" / "2D-i" / "P1" / "volumes.tsv"
    pd.read_csv(path, sep="\t").drop(columns="flag").to_csv(path, sep="\t", index=False)
    with pytest.raises(PatientInputError, match="flag"):
        read_volumes("P1", path)


@pytest.mark.slow
def test_report_annotations_lint_clean(tmp_path):
    """rules/evaluation.smk parses with its report() captions, and `snakemake --lint` finds nothing in it."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    text = (REPO / "rules" / "evaluation.smk").read_text()
    for caption in re.findall(r'caption="([^"]+)"', text):
        assert (REPO / "rules" / caption).resolve().is_file(), caption
    out = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--snakefile", str(REPO / "Snakefile"),
                          "--directory", str(REPO), "--configfile", str(cfg_path), "--lint"],
                         capture_output=True, text=True, timeout=300)
    assert "Traceback" not in out.stderr + out.stdout
    assert "evaluation.smk" not in out.stdout + out.stderr, out.stdout[-3000:]
    assert "rule evaluate" not in out.stdout and "rule perturb" not in out.stdout


@pytest.mark.slow
def test_full_run_builds_the_report_from_onsuccess(tmp_path):
    """A run of the default target ends with <results>/report.html (onsuccess -> nested snakemake
    --report --nolock): it returns, and the report holds the evaluation entries and captions.
    The DAG is completed with placeholders (--touch) and one real job is forced so the run succeeds."""
    from workflow_helpers import manifest_config, mark_complete, snakemake, write_config, write_manifest

    manifest = write_manifest(tmp_path / "raw" / "manifest.tsv", ["TR01", "TR02", "TR03", "TR04"], ["TE01"],
                              images="nifti")
    # results_dir comes from --config on every call, so the nested report run must get it too
    cfg = write_config(tmp_path / "config.yaml", manifest_config(manifest, results="not_the_results"))
    override = ("--config", "results_dir=results")
    mark_complete(tmp_path, cfg, *override)  # extra args ride along after the helper's own
    report = tmp_path / "results" / "report.html"
    assert not report.exists()  # --touch runs build no report
    out = snakemake(tmp_path, cfg, "--cores", "1", "--forcerun", "cohort_table", *override, timeout=600)
    assert report.is_file(), out.stderr[-3000:]
    text = report.read_text()
    for entry in ("table2.html", "adherence.html", "calibration.html", "pit.png", "perturbation.png",
                  "5. Evaluation", "6. Clinical guidance", "PIT (rank) histogram"):
        assert entry in text, entry
    assert "WARNING: building the report failed" not in out.stderr
