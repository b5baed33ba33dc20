"""Per-patient input errors and the failure record that feeds ``results/qc/failures.tsv``.

A stage that meets bad input raises :class:`PatientInputError` naming the patient, the file and the
problem. The CLI records it under ``<results>/qc/failures/<stage>__<patient>.json`` before exiting
non-zero, so with ``snakemake --keep-going`` the other patients finish and the workflow's
``onerror``/``onsuccess`` handler gathers one table of what failed and why.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from hemexp.core.files import read_json, write_json
from hemexp.core.layout import Layout

FAILURE_COLUMNS = ("stage", "patient_id", "file", "problem", "time")


class PatientInputError(RuntimeError):
    """Bad input for one patient: names the patient, the offending file and the problem."""

    def __init__(self, patient_id: str, file: str | Path | None, problem: str):
        self.patient_id = patient_id
        self.file = str(file) if file is not None else ""
        self.problem = problem
        where = f", file {self.file}" if self.file else ""
        super().__init__(f"patient {patient_id}{where}: {problem}")


def record_failure(results_dir: str | Path, stage: str, err: PatientInputError) -> Path:
    """Write one failure record (atomic); returns its path."""
    path = Layout(Path(results_dir)).failures_dir / f"{stage}__{err.patient_id}.json"
    write_json(
        path,
        {"stage": stage, "patient_id": err.patient_id, "file": err.file, "problem": err.problem,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
    )
    return path


def clear_failure(results_dir: str | Path, stage: str, patient_id: str) -> None:
    """Remove a stale record when a patient's stage later succeeds."""
    (Layout(Path(results_dir)).failures_dir / f"{stage}__{patient_id}.json").unlink(missing_ok=True)


def collect_failures(results_dir: str | Path) -> pd.DataFrame:
    """Gather every failure record into ``<results>/qc/failures.tsv`` (always written, maybe empty)."""
    records = [read_json(p) for p in sorted(Layout(Path(results_dir)).failures_dir.glob("*.json"))]
    table = pd.DataFrame(records, columns=list(FAILURE_COLUMNS))
    out = Layout(Path(results_dir)).failures_table
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tsv.tmp")
    table.to_csv(tmp, sep="\t", index=False)
    tmp.replace(out)
    return table


class ManifestError(ValueError):
    """Every problem found in a manifest, one line each, naming row, patient and column."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.problems = problems
        super().__init__(f"manifest {path}: {len(problems)} problem(s)\n  - " + "\n  - ".join(problems))
