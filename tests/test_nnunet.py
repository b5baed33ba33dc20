"""nnU-Net baselines: the raw-dataset export, the conversion back to masks, the rules, and a smoke run
of nnU-Net's own plan -> train -> predict in its separate environment (slow; builds .venv-nnunet)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from hemexp import cli
from hemexp.baselines.nnunet.dataset import (
    CHANNEL_NAMES,
    LABELS,
    dataset_json,
    export_heldout_case,
    export_training,
    follow_up_label,
    heldout_image_paths,
    layout,
    prediction_to_masks,
)
from hemexp.core.config import ConfigError, load_config, validate_config
from hemexp.core.errors import PatientInputError

SHAPE = (32, 32, 12)
AFFINE = np.array([[3.0, 0, 0, -48], [0, 3.0, 0, -60], [0, 0, 3.0, -20], [0, 0, 0, 1]])
# The tiny synthetic cohort the config below derives: A001, A002, B001 train; D001 test.
TRAIN_IDS, TEST_IDS = ["A001", "A002", "B001"], ["D001"]


def _config(results: Path, **nnunet) -> dict:
    cfg = copy.deepcopy(load_config())
    cfg["results_dir"] = str(results)
    cfg["cohort"]["synthetic"]["sites"] = {"A": 2, "B": 1, "D": 1}
    cfg["cohort"]["synthetic"]["test_sites"] = ["D"]
    cfg["baselines"] = ["copy", "nnunet_2d"]
    cfg["nnunet"].update(nnunet)
    validate_config(cfg)
    return cfg


def _write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def _fake_patient(results: Path, pid: str, seed: int) -> dict[str, np.ndarray]:
    """Preprocessed files of one patient as the preprocess stage writes them (model grid, HU, uint8).

    The follow-up IVH overlaps the follow-up IPH on purpose (the export must label the overlap IPH).
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    cx = 12 + seed % 6
    r = 3 + seed % 3
    ball = (x - cx) ** 2 + (y - 16) ** 2 + 2 * (z - 6) ** 2
    arrays = {
        "bl_iph": (ball < r**2).astype(np.uint8),
        "fu_iph": (ball < (r + 2) ** 2).astype(np.uint8),
        "bl_ivh": ((abs(x - 24) < 2) & (abs(y - 8) < 3) & (abs(z - 6) < 2)).astype(np.uint8),
        "fu_ivh": ((abs(x - 24) < 3) & (abs(y - 8) < 3) & (abs(z - 6) < 3)).astype(np.uint8),
    }
    arrays["fu_ivh"][cx, 16, 6] = 1  # overlap with the IPH core
    ct = rng.normal(30.0, 5.0, SHAPE).astype(np.float32)
    ct[arrays["bl_iph"] > 0] += 45.0
    arrays["bl_ct"] = ct
    for name, data in arrays.items():
        _write(results / "preprocessed" / pid / f"{name}.nii.gz", data)
    return arrays


@pytest.fixture()
def cohort(tmp_path: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    cfg = _config(tmp_path / "results")
    arrays = {pid: _fake_patient(tmp_path / "results", pid, seed) for seed, pid in enumerate(TRAIN_IDS + TEST_IDS)}
    return cfg, arrays


def test_follow_up_label_values_and_iph_wins():
    iph = np.array([0, 1, 1, 0], np.uint8)
    ivh = np.array([0, 0, 1, 1], np.uint8)
    assert follow_up_label(iph, ivh).tolist() == [0, 1, 1, 2]


def test_export_channels_labels_geometry(cohort):
    cfg, arrays = cohort
    assert export_training(cfg, TRAIN_IDS) == []
    for pid in TEST_IDS:
        export_heldout_case(cfg, pid)
    raw = layout(cfg).raw_dataset
    assert raw.name == "Dataset501_HemExp"
    assert sorted(p.name for p in (raw / "labelsTr").iterdir()) == [f"{p}.nii.gz" for p in TRAIN_IDS]
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [
        f"{p}_{c:04d}.nii.gz" for p in TRAIN_IDS for c in range(3)]
    assert sorted(p.name for p in (raw / "imagesTs").iterdir()) == [f"D001_{c:04d}.nii.gz" for c in range(3)]
    for pid in TRAIN_IDS + TEST_IDS:
        folder = raw / ("imagesTr" if pid in TRAIN_IDS else "imagesTs")
        for channel, name in enumerate(("bl_ct", "bl_iph", "bl_ivh")):
            img = nib.load(folder / f"{pid}_{channel:04d}.nii.gz")
            np.testing.assert_array_equal(np.asanyarray(img.dataobj), arrays[pid][name])
            np.testing.assert_allclose(img.affine, AFFINE)
    for pid in TRAIN_IDS:
        lab = nib.load(raw / "labelsTr" / f"{pid}.nii.gz")
        data = np.asanyarray(lab.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data).tolist()) == {0, 1, 2}
        np.testing.assert_allclose(lab.affine, AFFINE)
        fu_iph, fu_ivh = arrays[pid]["fu_iph"] > 0, arrays[pid]["fu_ivh"] > 0
        assert (fu_iph & fu_ivh).any()  # the fixture's overlap is there ...
        np.testing.assert_array_equal(data == 1, fu_iph)  # ... and labelled IPH
        np.testing.assert_array_equal(data == 2, fu_ivh & ~fu_iph)
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "noNorm", "2": "noNorm"} == CHANNEL_NAMES
    assert meta["labels"] == {"background": 0, "IPH": 1, "IVH": 2} == LABELS
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta == dataset_json(3)


def test_export_reports_every_bad_patient_and_writes_nothing(cohort):
    cfg, arrays = cohort
    results = Path(cfg["results_dir"])
    _write(results / "preprocessed" / "A001" / "bl_ivh.nii.gz", arrays["A001"]["bl_ivh"] * 3)
    _write(results / "preprocessed" / "B001" / "fu_iph.nii.gz", arrays["B001"]["fu_iph"][:, :, :10])
    errors = export_training(cfg, TRAIN_IDS)
    assert [(e.patient_id, Path(e.file).name) for e in errors] == [("A001", "bl_ivh.nii.gz"), ("B001", "fu_iph.nii.gz")]
    assert "not binary" in errors[0].problem and "grid" in errors[1].problem
    raw = layout(cfg).raw_dataset
    assert not (raw / "imagesTr").exists() and not (raw / "dataset.json").exists()
    (results / "preprocessed" / "D001" / "bl_ct.nii.gz").unlink()
    with pytest.raises(PatientInputError, match="D001.*missing"):
        export_heldout_case(cfg, "D001")


def test_export_command_records_failures(cohort, tmp_path):
    cfg, arrays = cohort
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    (Path(cfg["results_dir"]) / "preprocessed" / "A002" / "fu_ivh.nii.gz").unlink()
    assert cli.main(["nnunet-export", "--config", str(cfg_path)]) == 1
    record = json.loads((Path(cfg["results_dir"]) / "qc" / "failures" / "nnunet-export__A002.json").read_text())
    assert record["patient_id"] == "A002" and record["file"].endswith("fu_ivh.nii.gz")
    _write(Path(cfg["results_dir"]) / "preprocessed" / "A002" / "fu_ivh.nii.gz", arrays["A002"]["fu_ivh"])
    assert cli.main(["nnunet-export", "--config", str(cfg_path)]) == 0
    assert not (Path(cfg["results_dir"]) / "qc" / "failures" / "nnunet-export__A002.json").exists()


def test_prediction_to_masks_on_model_grid(tmp_path):
    label = np.zeros(SHAPE, np.uint8)
    label[4:8, 4:8, 2:5] = 1
    label[20:22, 20:24, 6:8] = 2
    ref = tmp_path / "bl_ct.nii.gz"
    _write(ref, np.zeros(SHAPE, np.float32))
    _write(tmp_path / "pred.nii.gz", label)
    counts = prediction_to_masks("D001", tmp_path / "pred.nii.gz", ref, tmp_path / "out")
    assert counts == {"iph": 48.0, "ivh": 16.0}
    for name, value in (("iph", 1), ("ivh", 2)):
        img = nib.load(tmp_path / "out" / f"{name}.nii.gz")
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), (label == value).astype(np.uint8))
        np.testing.assert_allclose(img.affine, AFFINE)
    shifted = AFFINE.copy()
    shifted[0, 3] += 3.0
    _write(tmp_path / "foreign.nii.gz", label, shifted)
    with pytest.raises(PatientInputError, match="does not match the model grid"):
        prediction_to_masks("D001", tmp_path / "foreign.nii.gz", ref, tmp_path / "out2")
    _write(tmp_path / "bad.nii.gz", label * 2)
    with pytest.raises(PatientInputError, match="unexpected label values"):
        prediction_to_masks("D001", tmp_path / "bad.nii.gz", ref, tmp_path / "out3")


def test_schema_folds_and_baselines(tmp_path):
    _config(tmp_path, folds=["all"])
    _config(tmp_path, folds=[0, 1, 2, 3, 4])
    for bad in ({"folds": [5]}, {"folds": ["ALL"]}, {"device": "gpu"}, {"trainer": "MyTrainer"}):
        with pytest.raises(ConfigError, match="nnunet"):
            _config(tmp_path, **bad)


def test_env_file_pins_torch_first_and_nnunet_version():
    from hemexp.baselines.nnunet.run import pip_requirements

    pins = pip_requirements()
    assert pins[0] == "torch==2.13.0" and "nnunetv2==2.8.1" in pins
    assert all("==" in p for p in pins)


# ----------------------------------------------------------------------------- workflow (slow)
@pytest.mark.slow
def test_rules_adding_a_test_patient_never_retrains_nnunet(tmp_path):
    from workflow_helpers import manifest_config, mark_complete, plan, write_config, write_manifest

    train, test = ["TR01", "TR02", "TR03", "TR04", "TR05"], ["TE01", "TE02"]
    raw = tmp_path / "raw"
    overrides = {"baselines": ["copy", "nnunet_2d", "nnunet_3d"]}
    cfg = write_config(tmp_path / "base.yaml", manifest_config(write_manifest(raw / "m.tsv", train, test), **overrides))
    rows = mark_complete(tmp_path, cfg)
    rules = {r.rule for r in rows}
    assert {"nnunet_export", "nnunet_export_test", "nnunet_plan", "nnunet_train", "nnunet_predict",
            "nnunet_masks"} <= rules
    trained = sorted(r.path.split("/nnunet/trained/")[1] for r in rows if r.rule == "nnunet_train")
    assert trained == [f"Dataset501_HemExp/nnUNetTrainer_HemExpDemo__nnUNetPlans__{c}/fold_0" for c in ("2d", "3d_fullres")]
    masks = sorted(r.path.split("/baselines/")[1] for r in rows if r.rule == "nnunet_masks")
    assert masks == [f"{b}/{p}/{m}.nii.gz" for b in ("nnunet_2d", "nnunet_3d") for p in test for m in ("iph", "ivh")]

    grown = write_config(tmp_path / "grown.yaml",
                         manifest_config(write_manifest(raw / "m2.tsv", train, [*test, "TE03"]), **overrides))
    pending = {r.path: r.rule for r in plan(tmp_path, grown) if r.pending}
    nnunet_pending = {path: rule for path, rule in pending.items() if rule.startswith("nnunet_")}
    assert set(nnunet_pending.values()) == {"nnunet_export_test", "nnunet_predict", "nnunet_masks"}
    assert all("TE03" in path for path in nnunet_pending), nnunet_pending


def test_active_baselines_select_configurations():
    """The rule family hangs on this: no nnU-Net baseline listed -> no nnU-Net rule at all."""
    from hemexp.baselines.nnunet.dataset import active_baselines

    assert active_baselines({"baselines": ["copy"]}) == {}
    assert active_baselines({"baselines": ["copy", "nnunet_3d"]}) == {"nnunet_3d": "3d_fullres"}
    assert active_baselines({"baselines": ["nnunet_2d", "nnunet_3d"]}) == {"nnunet_2d": "2d", "nnunet_3d": "3d_fullres"}


def test_one_baseline_table_feeds_workflow_training_and_table2():
    """One table (baselines/nnunet/dataset.py) names each nnU-Net baseline's configuration and Table 2
    label; the evaluation's selection and row order come from it (they were a second copy in
    evaluation/collect.py::NNUNET_METHODS and evaluation/table2.py::BASELINE_ORDER)."""
    from hemexp.baselines.nnunet.dataset import NNUNET_BASELINES, active_baselines, baseline_methods
    from hemexp.evaluation.table2 import BASELINE_ORDER, COPY_BASELINE

    old_methods = {"nnunet_2d": "nnUNet-2D", "nnunet_3d": "nnUNet-3D"}  # evaluation/collect.py before the merge
    old_configurations = {"nnunet_2d": "2d", "nnunet_3d": "3d_fullres"}  # baselines/nnunet/dataset.py before
    assert {b.name: b.method for b in NNUNET_BASELINES.values()} == old_methods
    assert {b.name: b.configuration for b in NNUNET_BASELINES.values()} == old_configurations
    for listed in (["copy"], ["copy", "nnunet_3d"], ["nnunet_3d", "nnunet_2d"], ["nnunet_2d", "copy", "nnunet_3d"]):
        cfg = {"baselines": listed}
        assert baseline_methods(cfg) == {b: old_methods[b] for b in listed if b in old_methods}
        assert list(active_baselines(cfg)) == list(baseline_methods(cfg))  # trained == scored, same order
    assert BASELINE_ORDER == (COPY_BASELINE, "nnUNet-2D", "nnUNet-3D")


# ----------------------------------------------------------------------------- nnU-Net itself (slow)
@pytest.fixture(scope="module")
def nnunet_env():
    """nnU-Net's own venv (.venv-nnunet), built on first use; skipped when it cannot be built here."""
    from hemexp.baselines.nnunet.run import NnunetEnvError, nnunet_bin

    try:
        return nnunet_bin(load_config())
    except NnunetEnvError as err:
        pytest.skip(f"nnU-Net environment unavailable (offline, or no python3.11?): {err}")


@pytest.mark.slow
def test_smoke_plan_train_predict(cohort, tmp_path, nnunet_env, capsys):
    """Plan + a 4-iteration 2d training (fold 'all') + predict on 3 tiny training cases and 1 test case."""
    cfg, _ = cohort
    cfg["nnunet"].update(trainer="nnUNetTrainer_HemExpSmoke", folds=["all"], device="cpu", tta=False)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    timings = {}
    for name, argv in (
        ("export", ["nnunet-export"]),
        ("export_test", ["nnunet-export-test", "D001"]),
        ("plan", ["nnunet-plan"]),
        ("train", ["nnunet-train", "2d", "all"]),
        ("predict", ["nnunet-predict", "2d", "D001"]),
        ("masks", ["nnunet-masks", "nnunet_2d", "D001"]),
    ):
        start = time.perf_counter()
        assert cli.main([*argv, "--config", str(cfg_path)]) == 0, name
        timings[name] = round(time.perf_counter() - start, 1)
    with capsys.disabled():
        print(f"\nnnU-Net smoke timings (s): {timings}")
    lay = layout(cfg)
    fold = lay.fold_dir("nnUNetTrainer_HemExpSmoke", "2d", "all")
    assert (fold / "checkpoint_final.pth").is_file()
    assert (lay.preprocessed_dataset / "nnUNetPlans.json").is_file()
    ref = nib.load(heldout_image_paths(cfg, "D001")[0])
    for name in ("iph", "ivh"):
        img = nib.load(Path(cfg["results_dir"]) / "baselines" / "nnunet_2d" / "D001" / f"{name}.nii.gz")
        assert img.shape == ref.shape and img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
        assert set(np.unique(np.asanyarray(img.dataobj)).tolist()) <= {0, 1}
    leftovers = [p for p in lay.root.rglob("*.tmp")]
    assert leftovers == [], f"staging folders left behind: {leftovers}"
