"""Incremental reruns, asserted on Snakemake's plan for a small manifest cohort.

The baseline is a *completed* workflow made without running a job (placeholder outputs +
``snakemake --touch``, which also records the params/input metadata that rerun triggers compare).
Each scenario changes the manifest or the config and reads the plan back (``--summary``). Expected
per-patient rules are read from the baseline plan itself (the rules whose outputs name an existing
patient of the same split), so these tests cover every pipeline stage that exists when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from workflow_helpers import (
    COHORT_RULES,
    FIXED_RULE,
    SAMPLING_RULE,
    TRAINING_RULE,
    PlannedOutput,
    ancestors,
    manifest_config,
    mark_complete,
    patient_of,
    per_patient_rules,
    plan,
    rule_graph,
    write_config,
    write_manifest,
)

# More training patients than preprocess.template_n_patients (4): the added TR06 sorts after the
# template patients, so it does not change the template (adding a template patient re-registers all).
TRAIN = ["TR01", "TR02", "TR03", "TR04", "TR05"]
TEST = ["TE01", "TE02"]
ALL_IDS = set(TRAIN + TEST + ["TR06", "TE03"])
pytestmark = pytest.mark.slow  # a handful of Snakemake DAG builds (~2 s each on an idle machine)


@dataclass
class Completed:
    """A finished baseline run: its work folder, raw folder and the plan of every output."""

    workdir: Path
    raw: Path
    rows: list[PlannedOutput]

    def scenario(self, name: str, train=TRAIN, test=TEST, **overrides) -> list[PlannedOutput]:
        """Plan after switching to a manifest with these patients and these config overrides."""
        manifest = self.raw / "manifest.tsv"  # the baseline's, untouched, unless the cohort changes
        if (list(train), list(test)) != (TRAIN, TEST):
            manifest = write_manifest(self.raw / f"manifest_{name}.tsv", list(train), list(test))
        cfg = write_config(self.workdir / f"config_{name}.yaml", manifest_config(manifest, **overrides))
        return plan(self.workdir, cfg)


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> Completed:
    workdir = tmp_path_factory.mktemp("incremental")
    raw = workdir / "raw"
    manifest = write_manifest(raw / "manifest.tsv", TRAIN, TEST)
    cfg = write_config(workdir / "config_base.yaml", manifest_config(manifest))
    rows = mark_complete(workdir, cfg)
    return Completed(workdir, raw, rows)


def _pending(rows: list[PlannedOutput]) -> list[PlannedOutput]:
    return [r for r in rows if r.pending]


def _assert_only_patient_added(rows, baseline, new: str, like: str) -> None:
    """Pending = the new patient's per-patient jobs (same rules as patient ``like``) + aggregations."""
    pending = _pending(rows)
    new_rules = {r.rule for r in pending if patient_of(r.path, ALL_IDS) == new}
    assert new_rules == per_patient_rules(baseline, like, ALL_IDS)
    others = sorted(r.path for r in pending if patient_of(r.path, ALL_IDS) not in (None, new))
    assert others == [], f"jobs of unchanged patients rescheduled: {others[:10]}"
    retrain = sorted({r.rule for r in pending if FIXED_RULE.match(r.rule)})
    assert retrain == [], f"models retrained: {retrain}"
    assert set(COHORT_RULES) <= {r.rule for r in pending}  # the cohort changed: aggregations rerun


def test_baseline_is_complete_and_unchanged_rerun_does_nothing(completed):
    assert completed.rows and not _pending(completed.rows)
    assert {"validate_manifest", "cohort_table"} <= {r.rule for r in completed.rows}
    assert _pending(plan(completed.workdir, completed.workdir / "config_base.yaml")) == []


def test_adding_a_test_patient_schedules_only_its_jobs(completed):
    rows = completed.scenario("add_test", test=TEST + ["TE03"])
    _assert_only_patient_added(rows, completed.rows, "TE03", like="TE01")


def test_adding_a_training_patient_retrains(completed):
    rows = completed.scenario("add_train", train=TRAIN + ["TR06"])
    pending = _pending(rows)
    assert {r.rule for r in pending if patient_of(r.path, ALL_IDS) == "TR06"} == \
        per_patient_rules(completed.rows, "TR01", ALL_IDS)
    training = {r.rule for r in completed.rows if TRAINING_RULE.match(r.rule)}
    assert training <= {r.rule for r in pending}, f"not retrained: {training - {r.rule for r in pending}}"


def test_adding_a_training_patient_with_frozen_models_does_not_retrain(completed):
    rows = completed.scenario("add_train_frozen", train=TRAIN + ["TR06"], freeze_models=True)
    _assert_only_patient_added(rows, completed.rows, "TR06", like="TR01")


def test_changing_a_sampling_parameter_reruns_only_sampling_and_evaluation(completed):
    cfg = manifest_config(completed.raw / "manifest.tsv")
    rows = completed.scenario("sampling", **{"sampling.ddim_steps": cfg["sampling"]["ddim_steps"] + 1})
    graph = rule_graph(completed.rows)
    sampling = {r for r in graph if SAMPLING_RULE.match(r)}
    upstream = set().union(*(ancestors(graph, r) for r in sampling)) - sampling
    forbidden = upstream | set(COHORT_RULES) | {r for r in graph if FIXED_RULE.match(r)}
    pending = _pending(rows)
    assert sorted({r.rule for r in pending} & forbidden) == []
    sample_rows = [r for r in rows if r.rule in sampling]
    assert all(r.pending for r in sample_rows)
    if not sampling:  # no sampling stage yet: nothing reads the sampling section
        assert pending == []
