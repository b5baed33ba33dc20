#!/usr/bin/env python
"""Time building the workflow's DAG (a dry run) for a large manifest cohort.

Creates N patients' raw files as empty placeholders and a manifest in a temporary folder, then
times (1) manifest validation as the Snakefile does it (``hemexp.cohort.patients.patients``), (2) a full
``snakemake --dry-run`` of the default target, reporting the planned jobs per rule and peak memory, and
(3) the same dry run of the anchor ``scripts/dag_toy/Snakefile`` (7 rules of the same per-patient
shape, plain ``expand`` inputs) for as many patients, with the ratio. Nothing is run and nothing under
the repository is written.

    .venv/bin/python scripts/bench_dag.py --patients 10000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hemexp.cohort.manifest import IMAGE_COLUMNS  # noqa: E402
from hemexp.cohort.patients import patients  # noqa: E402
from hemexp.core.clinical import CLINICAL_NAMES  # noqa: E402

CLINICAL = {"onset_to_ct_h": "3", "baseline_iph_ml": "12", "anticoagulant": "0", "antiplatelet": "1",
            "age": "70", "gcs": "13", "sbp": "160"}


def make_cohort(root: Path, n: int, test_fraction: float) -> Path:
    """Placeholder raw files (empty) for ``n`` patients and their manifest; returns the manifest path."""
    n_test = int(round(n * test_fraction))
    rows = []
    for i in range(n):
        pid = f"P{i:06d}"
        folder = root / "raw" / pid
        folder.mkdir(parents=True)
        files = {c: f"{pid}/{c}.nii.gz" for c in IMAGE_COLUMNS}
        for rel in files.values():
            (root / "raw" / rel).touch()
        split = "test" if i >= n - n_test else "train"
        rows.append({"patient_id": pid, "site": "D" if split == "test" else "ABC"[i % 3], "split": split,
                     **files, **{k: CLINICAL[k] for k in CLINICAL_NAMES}})
    manifest = root / "raw" / "manifest.tsv"
    pd.DataFrame(rows).to_csv(manifest, sep="\t", index=False)
    return manifest


def write_config(root: Path, manifest: Path) -> Path:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    cfg["results_dir"] = str(root / "results")
    cfg["cohort"]["source"] = "manifest"
    cfg["cohort"]["manifest"] = str(manifest)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def time_validation(cfg_path: Path) -> tuple[float, float, int]:
    cfg = yaml.safe_load(cfg_path.read_text())
    t0, cpu0 = time.perf_counter(), time.process_time()
    n = len(patients(cfg))
    return time.perf_counter() - t0, time.process_time() - cpu0, n


TOY = REPO / "scripts" / "dag_toy" / "Snakefile"


def dry_run(root: Path, cfg_path: Path | None, snakefile: Path,
            extra: Sequence[str] = ()) -> tuple[float, float, float, dict[str, int], str]:
    """Wall time, CPU time and peak memory (MB) of ``snakemake -n --quiet rules`` and the job count per
    rule it prints.

    CPU time is reported too because on a shared machine wall time mostly measures the neighbours;
    CPU and peak memory are this one child's own (``os.wait4``).
    """
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--snakefile", str(snakefile),
           "--directory", str(root), *(["--configfile", str(cfg_path)] if cfg_path else []), *extra,
           "--dry-run", "--quiet", "rules", "--cores", "1"]
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed:\n{text[-3000:]}")
    counts = {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", text, flags=re.M)}
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, counts, text


def toy_dry_run(root: Path, n: int) -> dict[str, Any]:
    """The anchor: the 7-rule toy workflow of the same per-patient shape (``scripts/dag_toy``)."""
    work = root / "toy"
    work.mkdir(exist_ok=True)
    elapsed, cpu, rss, counts, _ = dry_run(work, None, TOY, ["--config", f"npat={n}"])
    return {"dry_run_s": round(elapsed, 2), "dry_run_cpu_s": round(cpu, 2), "peak_rss_mb": round(rss),
            "jobs": counts.get("total")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10000)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the cohort here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--reuse", action="store_true", help="reuse the cohort already in --workdir")
    parser.add_argument("--snakefile", type=Path, default=REPO / "Snakefile",
                        help="workflow to time (e.g. a modified copy of this one)")
    parser.add_argument("--no-toy", action="store_true", help="skip the toy anchor (scripts/dag_toy/Snakefile)")
    args = parser.parse_args(argv)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="hemexp-bench-dag-"))
    try:
        t0 = time.perf_counter()
        manifest = root / "raw" / "manifest.tsv"
        if not (args.reuse and manifest.exists()):
            manifest = make_cohort(root, args.patients, args.test_fraction)
        cfg_path = write_config(root, manifest)
        setup_s = time.perf_counter() - t0
        validate_s, validate_cpu_s, n = time_validation(cfg_path)
        dag_s, dag_cpu_s, rss, counts, _ = dry_run(root, cfg_path, args.snakefile)
        figures = {"patients": n, "cohort_setup_s": round(setup_s, 2),
                   "manifest_validation_s": round(validate_s, 2), "manifest_validation_cpu_s": round(validate_cpu_s, 2),
                   "dry_run_s": round(dag_s, 2), "dry_run_cpu_s": round(dag_cpu_s, 2), "peak_rss_mb": round(rss),
                   "jobs": counts.get("total"), "jobs_per_rule": {k: v for k, v in counts.items() if k != "total"}}
        if not args.no_toy:  # measured in the same run, right after: the ratio is what the goal is about
            toy = toy_dry_run(root, args.patients)
            figures["toy"] = toy
            figures["cpu_ratio_to_toy"] = round(dag_cpu_s / toy["dry_run_cpu_s"], 2)
            figures["wall_ratio_to_toy"] = round(dag_s / toy["dry_run_s"], 2)
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
