"""The SLURM profile: it resolves from the repository root, every rule asks for resources from the
config in the executor plugin's terms, and a small pipeline runs end to end on a real one-node
SLURM (tests/slurm_cluster.py) through ``snakemake --profile slurm``."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from workflow_helpers import (
    REPO,
    default_config,
    manifest_config,
    plan,
    snakemake,
    write_config,
    write_manifest,
)

from hemexp.workflow.resources import rule_resources


class _Resources(dict):
    """What the plugin sees as ``job.resources``: mapping access plus attribute access."""

    __getattr__ = dict.get


def _fake_job(resources: dict) -> SimpleNamespace:
    return SimpleNamespace(resources=_Resources(resources), threads=1, name="rule", is_group=lambda: False)


def test_profile_resolves_from_the_repository_root(monkeypatch):
    from snakemake.cli import get_profile_dir

    monkeypatch.chdir(REPO)
    profile_dir, profile_file = get_profile_dir("slurm")
    assert profile_dir.resolve() == REPO / "slurm" and profile_file.name in ("config.yaml", "profile.yaml")
    profile = yaml.safe_load(profile_file.read_text())
    assert profile["executor"] == "slurm"
    assert not {"cpus_per_task", "mem_mb", "gpu"} & set(profile.get("default-resources") or {})  # per rule, from config


@pytest.mark.parametrize("rule", ["train_vae", "train_diffusion", "encode", "sample", "preprocess", "validate_manifest"])
def test_rule_resources_become_the_right_sbatch_flags(rule):
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    cfg = default_config()
    spec = {**cfg["resources"]["default"], **cfg["resources"].get(rule, {})}
    job = _fake_job(rule_resources(cfg, rule))
    params = {"run_uuid": "x", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": "",
              "workdir": "/w"}
    call = get_submit_command(job, params) + set_gres_string(job)
    assert f"--cpus-per-task={spec['cpus']}" in call and f"--mem {spec['mem_mb']}" in call
    assert f"-t {spec['runtime']}" in call
    assert (f"--gpus={spec.get('gpus')}" in call) == bool(spec.get("gpus"))


def test_gpu_model_and_partition_pass_through():
    cfg = default_config()
    cfg["resources"]["train_vae"].update(gpu_model="a100", slurm_partition="gpu", slurm_extra="--qos=long")
    res = rule_resources(cfg, "train_vae")
    assert res["gpu_model"] == "a100" and res["slurm_partition"] == "gpu" and res["slurm_extra"] == "--qos=long"
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    assert set_gres_string(_fake_job(res)).strip() == f"--gpus=a100:{cfg['resources']['train_vae']['gpus']}"


def _dry_run_jobs(workdir: Path, configfile: Path) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job a dry run plans, from Snakemake's job listing."""
    out = snakemake(workdir, configfile, "--dry-run", "--cores", "1").stdout
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", out):
        name = re.search(r"^(?:local)?rule (\w+):", block, flags=re.M)
        res = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        if name and name.group(1) != "all":
            pairs = dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}
            jobs.append((name.group(1), pairs))
    return jobs


def test_every_planned_job_requests_resources_from_config(tmp_path):
    """Each job asks for the resources of a config entry: its own rule's (or ``default``), or, for a
    rule that borrows a resource class (``perturb`` runs like ``sample``), another entry's."""
    manifest = write_manifest(tmp_path / "raw" / "manifest.tsv", ["TR01", "TR02", "TR03", "TR04", "TR05"], ["TE01"])
    cfg = manifest_config(manifest)
    jobs = _dry_run_jobs(tmp_path, write_config(tmp_path / "config.yaml", cfg))
    assert {"validate_manifest", "cohort_table"} <= {r for r, _ in jobs}

    def requested(res: dict) -> dict:
        return {k: str(res[k]) for k in ("cpus_per_task", "mem_mb", "runtime", "gpu") if k in res}

    classes = [requested(rule_resources(cfg, name)) for name in cfg["resources"]]
    for rule, res in jobs:
        own = requested(rule_resources(cfg, rule))
        got = requested(res)
        assert got == own or (rule not in cfg["resources"] and got in classes), (rule, got)
        if cfg["resources"].get(rule, {}).get("gpus"):
            assert got["gpu"] == str(cfg["resources"][rule]["gpus"]), rule


# --- end to end on the one-node cluster -------------------------------------------------------------

TEST_PROFILE = {
    # No job accounting on the test cluster: query squeue, submit without -A (see tests/slurm_cluster.py).
    "slurm-status-command": "squeue",
    "slurm-no-account": True,
    "slurm-init-seconds-before-status-checks": 1,
    "seconds-between-status-checks": 2,
    "slurm-keep-successful-logs": True,
    "latency-wait": 10,
    "retries": 0,
    "jobs": 4,
}


def small_resources(cfg: dict) -> dict:
    """1 CPU, 1 GB and 10 min for every rule, and no GPUs: the test node has none (no GresTypes), and
    sbatch rejects a --gpus request that no node can satisfy. GPU rules keep their CPU fallback."""
    for spec in cfg["resources"].values():
        spec.update(cpus=1, mem_mb=1000, runtime=10)
        if "gpus" in spec:
            spec["gpus"] = 0
    return cfg


def _slurm_jobs() -> list[tuple[str, str]]:
    """(comment, state) of every job the controller still remembers (MinJobAge keeps finished ones)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%k|%T"], capture_output=True, text=True, timeout=30)
    return [tuple(line.split("|", 1)) for line in out.stdout.splitlines() if "|" in line]


def small_synthetic_config(results: Path) -> dict:
    """A 5-patient synthetic cohort (3 train, 2 test; any expander share) with small SLURM requests."""
    cfg = small_resources(default_config())
    cfg["results_dir"] = str(results)
    cfg["cohort"]["synthetic"].update(n_patients=5, sites={"A": 3, "D": 2}, test_sites=["D"],
                                      expander_fraction=[0.0, 1.0])
    return cfg


@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_runs_end_to_end_through_the_slurm_profile(slurm_cluster, tmp_path):
    """synth -> validate_manifest -> cohort_table, and the first per-patient stage (ingest) of one
    test patient, each job submitted by the repository's profile to the one-node cluster."""
    cfg_file = write_config(tmp_path / "config.yaml", small_synthetic_config(tmp_path / "results"))
    profile = tmp_path / "test-profile"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump(TEST_PROFILE))
    ingest = [r.path for r in plan(tmp_path, cfg_file) if r.rule == "ingest" and Path(r.path).name == "D001"]
    targets = [str(tmp_path / "results" / "cohort" / "table1.md"), *ingest]  # ingest's output: the folder
    t0 = time.monotonic()
    snakemake(tmp_path, cfg_file, "--profile", str(REPO / "slurm"), "--profile", str(profile), *targets,
              timeout=900)
    print(f"SLURM end-to-end: {time.monotonic() - t0:.1f} s for {targets}")
    table = (tmp_path / "results" / "cohort" / "table1.md").read_text()
    assert "Train (A, n=3)" in table and "Test (D, n=2)" in table
    assert (tmp_path / "results" / "ingested" / "D001" / "ingest.json").is_file()
    ran = {r.rule for r in plan(tmp_path, cfg_file, *targets)}
    assert {"synth", "validate_manifest", "cohort_table", "ingest"} <= ran
    logs = {p.name for p in (tmp_path / ".snakemake" / "slurm_logs").iterdir()}
    assert {f"rule_{r}" for r in ran} <= logs  # every job went through sbatch (one log folder per rule)
    times = pd.read_csv(tmp_path / "results" / "benchmarks" / "rule_times.tsv", sep="\t").set_index("rule")
    assert ran <= set(times.index) and times.loc["ingest", "jobs"] >= 1  # onsuccess: every job's time by rule
    if slurm_cluster.started:  # our own cluster: its queue holds exactly this session's jobs
        done = {c.split("_wildcards_")[0] for c, state in _slurm_jobs() if state == "COMPLETED"}
        assert {f"rule_{r}" for r in ran} <= done
