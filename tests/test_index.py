"""Training-split indexes (hemexp/workflow/index.py): rule gather_index's file, and the training rules
that read it instead of every training patient's file (the 10,000-patient DAG, docs/orchestration.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hemexp.cli import main
from hemexp.cohort.patients import patients
from hemexp.core.config import DEFAULT_CONFIG, load_config
from hemexp.core.layout import Layout

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def cfg_path(tmp_path):
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_index_lists_every_training_patients_file_and_no_test_patient(cfg_path, capsys):
    cfg = load_config(cfg_path)
    layout, cohort = Layout.of(cfg), patients(cfg)
    train = sorted(p.patient_id for p in cohort if p.split == "train")
    test = [p.patient_id for p in cohort if p.split == "test"]
    assert train and test
    for pid in train + test:
        layout.shard(pid).parent.mkdir(parents=True, exist_ok=True)
        layout.shard(pid).touch()
    assert main(["gather-index", "shards", "--config", str(cfg_path)]) == 0
    lines = layout.index("shards").read_text().splitlines()
    assert lines == [str(layout.shard(p)) for p in train]
    assert f"{len(train)} training shards files" in capsys.readouterr().out


def test_index_names_the_patient_whose_file_is_missing(cfg_path, capsys):
    cfg = load_config(cfg_path)
    layout = Layout.of(cfg)
    train = sorted(p.patient_id for p in patients(cfg) if p.split == "train")
    for pid in train[1:]:
        layout.latents(pid).parent.mkdir(parents=True, exist_ok=True)
        layout.latents(pid).touch()
    assert main(["gather-index", "latents", "--config", str(cfg_path)]) != 0
    err = capsys.readouterr().err
    assert train[0] in err and "latents" in err
    assert not layout.index("latents").exists()  # nothing half-written


def test_training_rules_read_indexes_not_per_patient_lists():
    """No rule whose output every per-patient job reads may list the training patients' files."""
    rules = {p.name: p.read_text() for p in (REPO / "rules").glob("*.smk")}
    for name, rule in (("vae.smk", "train_vae"), ("diffusion.smk", "latent_stats"),
                       ("diffusion.smk", "train_diffusion"), ("sampling.smk", "train_classifier"),
                       ("sampling.smk", "fit_ood")):
        body = re.search(rf"rule {rule}:(.*?)output:", rules[name], re.S).group(1)
        assert "for p in TRAIN" not in body and "TRAIN_LATENTS" not in body, rule
        assert "train_index(" in body, rule
