"""Helpers for tests that drive the real Snakefile: tiny manifest cohorts, configs, plans.

A *plan* is what ``snakemake --summary`` says about every output of the DAG: its rule and whether
an update is pending. Tests assert on plans (rule names, patient IDs in output paths) rather than
on a fixed job list, so they keep holding as new pipeline stages add rules.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hemexp.cohort.manifest import IMAGE_COLUMNS
from hemexp.core.clinical import CLINICAL_NAMES

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "Snakefile"
VENV_BIN = Path(sys.executable).parent
# Rules that fit something on the whole training split: rerun when a training patient is added.
TRAINING_RULE = re.compile(r"^(train_.*|latent_stats)$")
# Rules that must never rerun for an added patient whose ID sorts after the template patients.
FIXED_RULE = re.compile(r"^(train_.*|latent_stats|build_template)$")
SAMPLING_RULE = re.compile(r"^sample(_.*)?$")
COHORT_RULES = ("validate_manifest", "cohort_table")


def default_config() -> dict[str, Any]:
    """A fresh copy of config/config.yaml as a dict."""
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def manifest_config(manifest: Path, results: Path | str = "results", **overrides: Any) -> dict[str, Any]:
    """Default config switched to a manifest cohort, with dotted-key overrides (``a.b=value``)."""
    cfg = default_config()
    cfg["results_dir"] = str(results)
    cfg["cohort"]["source"] = "manifest"
    cfg["cohort"]["manifest"] = str(manifest)
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return copy.deepcopy(cfg)


def _clinical_row(pid: str) -> dict[str, str]:
    """Valid clinical values derived from the ID alone, so adding a patient changes no other row."""
    i = zlib.crc32(pid.encode())
    values = {"onset_to_ct_h": 2.0 + i % 5, "baseline_iph_ml": 10.0 + i % 7, "anticoagulant": i % 2,
              "antiplatelet": (i // 2) % 2, "age": 60 + i % 20, "gcs": 10 + i % 5, "sbp": 150 + i % 30}
    return {k: f"{values[k]:g}" for k in CLINICAL_NAMES}


def _write_nifti(path: Path, data: np.ndarray, zooms: tuple[float, float, float]) -> None:
    import nibabel as nib

    affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))


def write_patient_files(raw: Path, pid: str, images: str = "empty") -> dict[str, str]:
    """Raw files of one patient under ``raw/<pid>/``: 'empty' placeholders or tiny 'nifti' volumes.

    Existing files are left alone (their mtimes must not change when a cohort grows).
    """
    folder = raw / pid
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(pid.encode()))
    rel = {}
    for col in IMAGE_COLUMNS:
        path = folder / f"{col}.nii.gz"
        rel[col] = f"{pid}/{path.name}"
        if path.exists():
            continue
        if images == "empty":
            path.touch()
        elif col.endswith("_ct"):
            _write_nifti(path, rng.normal(30, 10, (16, 16, 6)).astype(np.float32), (2.0, 2.0, 5.0))
        else:
            mask = np.zeros((16, 16, 6), np.uint8)
            r = 2 + (col.startswith("followup")) + int(rng.integers(0, 2))
            mask[8 - r : 8 + r, 8 - r : 8 + r, 2:4] = 1 if col.endswith("iph") else 0
            _write_nifti(path, mask, (2.0, 2.0, 5.0))
    return rel


def write_manifest(path: Path, train: list[str], test: list[str], images: str = "empty") -> Path:
    """A manifest TSV for the given patient IDs; raw files are created beside it (relative paths)."""
    import pandas as pd

    rows = []
    for pid, split in [(p, "train") for p in train] + [(p, "test") for p in test]:
        rel = write_patient_files(path.parent, pid, images)
        rows.append({"patient_id": pid, "site": "A" if split == "train" else "D", "split": split, **rel,
                     **_clinical_row(pid)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def snakemake_env() -> dict[str, str]:
    """The test interpreter's bin first on PATH, so rule shell commands find ``hemexp``."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the repository's Snakefile in ``workdir`` with ``configfile``; raise with the log on failure."""
    cmd = [str(VENV_BIN / "snakemake"), "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
           "--configfile", str(configfile), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or snakemake_env())
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}")
    return out


@dataclass(frozen=True)
class PlannedOutput:
    """One output file of the DAG as ``snakemake --detailed-summary`` reports it.

    ``inputs`` are the inputs recorded when the output was last made (empty before its first run).
    """

    path: str
    rule: str
    status: str
    pending: bool
    inputs: tuple[str, ...] = ()


def plan(workdir: Path, configfile: Path, *targets: str) -> list[PlannedOutput]:
    """Every output of the DAG with its rule and whether an update is pending (no job runs)."""
    out = snakemake(workdir, configfile, "--detailed-summary", "--cores", "1", *targets)
    rows = []
    lines = out.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("output_file\t"))
    for line in lines[start + 1 :]:
        fields = line.split("\t")
        if len(fields) >= 8:  # output, date, rule, log, inputs, shellcmd (may hold tabs), status, plan
            inputs = () if fields[4] == "-" else tuple(fields[4].split(","))
            rows.append(PlannedOutput(fields[0], fields[2], fields[-2], fields[-1] == "update pending", inputs))
    return rows


def mark_complete(workdir: Path, configfile: Path, *targets: str) -> list[PlannedOutput]:
    """Make the whole DAG look finished without running a job: placeholder outputs + ``--touch``.

    Outputs without a suffix become directories (the pipeline's ``directory()`` outputs are suffix-less
    folders); ``--forceall --touch`` then orders mtimes along the DAG and records Snakemake metadata
    (params, inputs, code), so params-based rerun triggers behave as after a real run.
    """
    for row in plan(workdir, configfile, *targets):
        path = Path(row.path) if Path(row.path).is_absolute() else workdir / row.path
        if path.exists():
            continue
        if Path(row.path).suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    snakemake(workdir, configfile, "--touch", "--forceall", "--cores", "1", *targets)
    return plan(workdir, configfile, *targets)


def patient_of(path: str, ids: set[str]) -> str | None:
    """The patient an output belongs to: a path component (or a file stem) equal to a patient ID."""
    parts = Path(path).parts
    tokens = set(parts) | {parts[-1].split(".")[0]}
    hits = tokens & ids
    if len(hits) > 1:
        raise AssertionError(f"{path} names several patients: {sorted(hits)}")
    return next(iter(hits), None)


def per_patient_rules(rows: list[PlannedOutput], pid: str, ids: set[str]) -> set[str]:
    """Rules with an output that belongs to patient ``pid``."""
    return {r.rule for r in rows if patient_of(r.path, ids) == pid}


def rule_graph(rows: list[PlannedOutput]) -> dict[str, set[str]]:
    """Rule -> the rules whose outputs it consumed, from the inputs recorded in a completed plan."""
    producer = {r.path: r.rule for r in rows}
    graph: dict[str, set[str]] = {r.rule: set() for r in rows}
    for r in rows:
        graph[r.rule] |= {producer[i] for i in r.inputs if i in producer and producer[i] != r.rule}
    return graph


def ancestors(graph: dict[str, set[str]], rule: str) -> set[str]:
    """Every rule whose output ``rule`` needs, directly or indirectly."""
    seen: set[str] = set()
    todo = list(graph.get(rule, ()))
    while todo:
        r = todo.pop()
        if r not in seen:
            seen.add(r)
            todo += graph.get(r, ())
    return seen
