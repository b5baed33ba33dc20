"""One owner of result paths (hemexp.core.layout), rule files that stand alone, resource keys = rule names.

The layout must keep every path of earlier releases (a results folder built before the stage packages
is still up to date), the rules must take their paths from it rather than spell them, and a rule file
may use only names from rules/common.smk, never another rule file's.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from hemexp.core.layout import MAP_KINDS, SAMPLE_MASK, Layout
from hemexp.workflow import resources
from hemexp.workflow.resources import DEPRECATED_KEYS, INHERITS, rule_resources

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "rules"
RULE_FILES = sorted(p for p in RULES.glob("*.smk") if p.name != "common.smk")


def test_layout_keeps_the_historic_paths():
    L = Layout(Path("res"))
    expected = {
        L.synthetic_manifest: "res/raw/manifest.tsv", L.truth: "res/raw/truth.json",
        L.table1("md"): "res/cohort/table1.md", L.manifest_check: "res/cohort/manifest_check.json",
        L.ingested("P1"): "res/ingested/P1", L.preprocessed("P1"): "res/preprocessed/P1",
        L.shard("P1"): "res/shards/P1.parquet", L.template_dir: "res/template",
        L.vae_model: "res/models/vae/vae.pt", L.latents("P1"): "res/latents/P1.npz",
        L.latent_stats: "res/latents/stats.json", L.diffusion_model("2D-ice"): "res/models/diffusion/2D-ice/model.pt",
        L.classifier: "res/models/classifier/classifier.joblib",
        L.samples("2D-ice", "P1"): "res/samples/2D-ice/P1",
        L.samples("2D-ice", "P1", flag_source="classifier"): "res/samples_classifier/2D-ice/P1",
        L.baseline_masks("nnunet_2d", "P1"): "res/baselines/nnunet_2d/P1", L.nnunet_dir: "res/nnunet",
        L.metric("table2.csv"): "res/metrics/table2.csv", L.figure("pit.png"): "res/figures/pit.png",
        L.report: "res/report.html", L.resolved_config: "res/config/resolved.yaml",
        L.failures_table: "res/qc/failures.tsv", L.mlflow_db: "res/mlflow/mlflow.db",
        L.log("synth"): "res/logs/synth.log", L.log("ingest", "P1"): "res/logs/ingest/P1.log",
        L.log("sample", "2D-ice", "P1"): "res/logs/sample/2D-ice/P1.log",
    }
    assert {str(k): v for k, v in expected.items()} == {v: v for v in expected.values()}


def test_wildcards_pass_through_the_layout():
    L = Layout(Path("results"))
    assert str(L.samples("{variant}", "{patient}", flag_source="{source}")) == "results/samples_{source}/{variant}/{patient}"
    assert [SAMPLE_MASK.format(k=k, structure="iph") for k in range(2)] == ["samples/sample_00_iph.nii.gz",
                                                                            "samples/sample_01_iph.nii.gz"]
    assert [f"native/{kind}_prob.nii.gz" for kind in MAP_KINDS] == ["native/iph_prob.nii.gz", "native/ivh_prob.nii.gz",
                                                                   "native/new_prob.nii.gz"]


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_rules_spell_no_result_path(rule_file):
    """Every path comes from the layout: no f-string on the results folder in a rule file."""
    text = rule_file.read_text()
    assert not re.findall(r'f"\{RESULTS\}', text), f"{rule_file.name} builds a result path by hand"


def _defined_names(text: str) -> set[str]:
    """Module-level names a rule file defines (assignments and functions, also inside `if` blocks)."""
    names = set(re.findall(r"^\s{0,4}([A-Za-z_]\w*)\s*=[^=]", text, flags=re.M))
    names |= set(re.findall(r"^\s{0,4}def\s+(\w+)", text, flags=re.M))
    return names - {"input", "output", "params", "log", "shell", "resources", "threads"}


def test_no_rule_file_uses_another_rule_files_names():
    defined = {p.name: _defined_names(p.read_text()) for p in RULE_FILES}
    offences = []
    for user in RULE_FILES:
        code = re.sub(r"#[^\n]*", "", user.read_text())
        for owner, names in defined.items():
            if owner == user.name:
                continue
            offences += [f"{user.name} uses {n} from {owner}" for n in names if re.search(rf"\b{n}\b", code)]
    assert not offences, offences


def _rule_blocks(text: str) -> list[tuple[str, str]]:
    """(rule name, its body) for every rule of a file."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*rule (\w+):", text, flags=re.M)]
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return [(name, text[s:e]) for (s, name), e in zip(starts, ends, strict=True)]


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_resource_keys_are_rule_names(rule_file):
    for rule, body in _rule_blocks(rule_file.read_text()):
        keys = set(re.findall(r'R\("(\w+)"\)', body))
        assert keys <= {rule}, f"rule {rule} asks for resources of {keys - {rule}}"


def _cfg(resources):
    return {"resources": {"default": {"cpus": 1, "mem_mb": 100, "runtime": 5}, **resources}}


def test_a_rule_without_its_own_entry_inherits_its_parent():
    cfg = _cfg({"sample": {"cpus": 4, "mem_mb": 800, "runtime": 60, "gpus": 1}})
    assert set(INHERITS) == {"perturb", "sample_flag_source", "nnunet_export_test"}
    for rule in ("perturb", "sample_flag_source"):
        assert rule_resources(cfg, rule) == rule_resources(cfg, "sample") == {
            "cpus_per_task": 4, "mem_mb": 800, "runtime": 60, "gpu": 1}
    own = _cfg({"sample": {"cpus": 4, "gpus": 1}, "perturb": {"cpus": 2}})
    assert rule_resources(own, "perturb") == {"cpus_per_task": 2, "mem_mb": 100, "runtime": 5, "gpu": 1}


def test_deprecated_keys_still_apply_with_a_message(caplog, monkeypatch):
    monkeypatch.setattr(resources, "_warned", set())  # the message is printed once per process
    old, new = "train_nnunet", DEPRECATED_KEYS["train_nnunet"]
    cfg = _cfg({old: {"cpus": 8, "gpus": 1}})
    with caplog.at_level(logging.WARNING):
        res = rule_resources(cfg, new)
    assert res["cpus_per_task"] == 8 and res["gpu"] == 1
    assert any(f"resources.{old} is deprecated" in r.message and f"resources.{new}" in r.message
               for r in caplog.records)
    both = _cfg({old: {"cpus": 8}, new: {"cpus": 3}})
    assert rule_resources(both, new)["cpus_per_task"] == 3  # the rule's own key wins
