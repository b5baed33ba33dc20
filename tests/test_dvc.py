"""DVC over the workflow: dvc.yaml agrees with the Snakefile, and on a tiny manifest cohort in a
temporary git repository `dvc add` / `dvc repro` / `dvc push` / `dvc pull` / `dvc exp run -S` /
`dvc metrics diff` work end to end (only the cheap cohort stage runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from workflow_helpers import (
    REPO,
    VENV_BIN,
    manifest_config,
    plan,
    snakemake_env,
    write_config,
    write_manifest,
)

from hemexp.core.config import load_config
from hemexp.tracking.runs import data_version

COPY = ["Snakefile", "dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "data/README.md",
        "rules", "config", "report", "envs", "hemexp"]


def _dvc_stages() -> dict:
    """dvc.yaml's stages with ``${results_dir}`` interpolated as DVC does (from config/config.yaml)."""
    results = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["results_dir"]
    text = (REPO / "dvc.yaml").read_text().replace("${results_dir}", results)
    return yaml.safe_load(text)["stages"]


def _paths(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_dvc_yaml_matches_the_workflow(tmp_path):
    """Every rule a stage names exists, and every DVC output is a workflow product (or a folder of them)."""
    manifest = write_manifest(tmp_path / "raw" / "manifest.tsv", ["TR01", "TR02", "TR03", "TR04", "TR05"],
                              ["TE01", "TE02"])
    cfg = write_config(tmp_path / "config.yaml", manifest_config(manifest))
    rows = plan(tmp_path, cfg)
    products = {r.path for r in rows}
    rules = {r.rule for r in rows}
    for name, stage in _dvc_stages().items():
        until = re.search(r"--until ([\w ]+)", stage["cmd"])
        assert stage["cmd"].startswith("snakemake --cores all"), name
        assert not until or set(until.group(1).split()) <= rules, (name, until.group(1))
        for path in _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots")):
            assert path in products or any(p.startswith(path + "/") for p in products), (name, path)
        for dep in _paths(stage.get("deps")):
            assert (REPO / dep).exists() or dep.split("/")[0] == "results" or dep == "data", (name, dep)
        params = stage["params"][0]["config/config.yaml"]
        assert set(params) <= set(yaml.safe_load((REPO / "config" / "config.yaml").read_text())), name


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _env() -> dict[str, str]:
    env = snakemake_env()
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               DVC_NO_ANALYTICS="1")
    return env


def _dvc(repo: Path, *args: str) -> str:
    return _run([str(VENV_BIN / "dvc"), *args], repo)


@pytest.fixture()
def dvc_repo(tmp_path) -> Path:
    """A copy of the project (code, rules, config, dvc.yaml) as a fresh git repository whose config
    uses a 5-patient manifest cohort under data/raw (tiny NIfTI volumes)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    for rel in COPY:
        src, dst = REPO / rel, repo / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    raw = repo / "data" / "raw"
    write_manifest(raw / "manifest.tsv", ["TR01", "TR02", "TR03"], ["TE01", "TE02"], images="nifti")
    write_manifest(raw / "manifest_small.tsv", ["TR01", "TR02"], ["TE01"], images="nifti")
    cfg = manifest_config(Path("data/raw/manifest.tsv"))
    write_config(repo / "config" / "config.yaml", cfg)
    _run(["git", "init", "-q"], repo)
    return repo


@pytest.mark.slow
def test_dvc_round_trip_push_pull_and_experiment(dvc_repo, tmp_path):
    repo = dvc_repo
    _dvc(repo, "add", "data/raw")
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "data"], repo)
    cfg = load_config(repo / "config" / "config.yaml")
    cwd = os.getcwd()
    try:  # data_version reads paths relative to the working directory, like the workflow's jobs
        os.chdir(repo)
        version = data_version(cfg)
    finally:
        os.chdir(cwd)
    dvc_md5 = yaml.safe_load((repo / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    assert version == f"dvc:{dvc_md5}"

    _dvc(repo, "repro", "cohort")
    table = repo / "results" / "cohort" / "table1.md"
    assert "Train (A, n=3)" in table.read_text()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["cohort"]
    assert lock["params"]["config/config.yaml"]["cohort"]["manifest"] == "data/raw/manifest.tsv"
    assert "Data and pipelines are up to date" in _dvc(repo, "status", "cohort")
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "cohort"], repo)

    # push to a local remote, lose the workspace copies and the cache, pull them back
    _dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    _dvc(repo, "push", "cohort", "data/raw.dvc")
    before = {p: p.read_bytes() for p in [table, repo / "data" / "raw" / "manifest.tsv",
                                          repo / "data" / "raw" / "TE01" / "baseline_ct.nii.gz"]}
    shutil.rmtree(repo / "data" / "raw")
    shutil.rmtree(repo / "results")
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, "pull", "cohort", "data/raw.dvc")
    assert {p: p.read_bytes() for p in before} == before
    assert "Data and pipelines are up to date" in _dvc(repo, "status", "cohort")

    # an experiment on a smaller cohort, compared with the committed metrics
    _dvc(repo, "exp", "run", "cohort", "-S", "config/config.yaml:cohort.manifest=data/raw/manifest_small.tsv")
    assert "Train (A, n=2)" in table.read_text()
    diff = json.loads(_dvc(repo, "metrics", "diff", "--json"))
    entry = diff["results/cohort/manifest_check.json"]
    assert entry["n_patients"] == {"old": 5, "new": 3, "diff": -2}
    exps = _dvc(repo, "exp", "show", "--json")
    assert "manifest_small.tsv" in exps
