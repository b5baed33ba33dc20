"""Per-patient input errors and the failure record that feeds ``results/qc/failures.tsv``.

A stage that meets bad input raises :class:`PatientInputError` naming the patient, the file and the
problem. The CLI records it under ``<results>/qc/failures/<stage>__<patient>.json`` before exiting
non-zero, so with ``snakemake --keep-going`` the other patients finish and the workflow's
``onerror``/``onsuccess`` handler gathers one table of what failed and why.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from hemexp.core.deid import scrub_text, shareable_path
from hemexp.core.files import ANY_TEMP, atomic_path, read_json, remove_stale_temps, write_json
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

    def shareable(self, manifest_dir: str | Path | None = None, results_dir: str | Path | None = None
                  ) -> PatientInputError:
        """This error as a shared output may show it (docs/deidentification.md): ``file`` relative to the
        manifest's folder or ``results_dir`` (else its name), every absolute path in ``problem`` too."""
        file = shareable_path(self.file, manifest_dir, results_dir) if self.file else None
        problem = scrub_text(self.problem, manifest_dir, results_dir, known={self.file: file or ""})
        return PatientInputError(self.patient_id, file, problem)


def record_failure(results_dir: str | Path, stage: str, err: PatientInputError,
                   manifest_dir: str | Path | None = None) -> Path:
    """Write one failure record (atomic; file and problem de-identified by
    :meth:`PatientInputError.shareable`); returns its path."""
    err = err.shareable(manifest_dir, results_dir)
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


def _read_record(path: Path) -> dict | None:
    try:
        record = read_json(path)
    except (OSError, ValueError) as err:  # a record is written atomically; this is someone's edit
        print(f"hemexp failures: skipping unreadable failure record {path.name} ({scrub_text(str(err))})",
              file=sys.stderr)
        return None
    return record if isinstance(record, dict) else None


def failures_rst(table: pd.DataFrame) -> str:
    """The failure table as reStructuredText for the HTML report (``report/workflow.rst`` includes it)."""
    if table.empty:
        return "No patient failed a stage.\n"
    cols = list(FAILURE_COLUMNS)
    cells = [[str(v).replace("\n", " ").replace("|", "/") for v in row] for row in table[cols].itertuples(index=False)]
    out = [f"{len(table)} failure(s), one line per patient and stage (``qc/failures.tsv``):", "",
           ".. list-table::", "   :header-rows: 1", ""]
    for row in [cols, *cells]:
        out += [f"   * - {row[0] or '-'}", *[f"     - {c or '-'}" for c in row[1:]]]
    return "\n".join(out) + "\n"


def collect_failures(results_dir: str | Path) -> pd.DataFrame:
    """Gather every failure record into ``<results>/qc/failures.tsv`` (always written, maybe empty).

    Temporaries of records (``.<stage>__<p>.<writer>.tmp.json``) are never read: stale ones (their
    writer killed) are removed, live ones left alone. Also writes ``qc/failures.rst`` for the report.
    """
    layout = Layout(Path(results_dir))
    folder = layout.failures_dir
    remove_stale_temps(folder, ANY_TEMP)
    paths = sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")) if folder.is_dir() else []
    records = [r for r in (_read_record(p) for p in paths) if r is not None]
    for rec in records:  # records of an older version: no absolute path reaches the table either
        for key in ("file", "problem"):
            if isinstance(rec.get(key), str):
                rec[key] = scrub_text(rec[key], results_dir=results_dir)
    table = pd.DataFrame(records, columns=list(FAILURE_COLUMNS))
    out = layout.failures_table
    with atomic_path(out) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    with atomic_path(layout.failures_rst) as tmp:
        tmp.write_text(failures_rst(table))
    return table


class ProductError(RuntimeError):
    """An intermediate product (not a patient's input) is missing, truncated or corrupt: one line
    naming the file, the problem and the stage to rerun (``hemexp`` exits 1 without a traceback)."""

    def __init__(self, file: str | Path, problem: str):
        self.file, self.problem = str(file), problem
        super().__init__(f"file {file}: {problem}")


def rerun_hint(stage: str, patient_id: str | None = None) -> str:
    """How to rebuild a product of ``stage``: the command, or delete the file and rerun Snakemake."""
    cmd = f"hemexp {stage}" + (f" {patient_id}" if patient_id else "")
    return f"rerun stage {stage} (delete the file and rerun snakemake, or `{cmd}`)"


@contextlib.contextmanager
def reading_product(path: str | Path, stage: str, patient_id: str | None = None,
                    what: str | None = None) -> Iterator[None]:
    """Around the read of an intermediate product written by ``stage``: a truncated or corrupt file
    (gzip/zip CRC, Parquet footer, JSON) becomes one :class:`PatientInputError` (with a patient,
    recorded by the per-patient command) or :class:`ProductError` naming file, problem and stage."""
    try:
        yield
    except (PatientInputError, ProductError, MemoryError, KeyboardInterrupt):
        raise
    except FileNotFoundError as err:
        problem = f"{what or stage + ' output'} missing; {rerun_hint(stage, patient_id)}"
        raise (PatientInputError(patient_id, path, problem) if patient_id else ProductError(path, problem)) from err
    except Exception as err:  # noqa: BLE001 - any decoder error of a damaged file
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        problem = (f"{what or stage + ' output'} is truncated or corrupt ({type(err).__name__}"
                   f"{': ' + detail[:160] if detail else ''}); {rerun_hint(stage, patient_id)}")
        raise (PatientInputError(patient_id, path, problem) if patient_id else ProductError(path, problem)) from err


class ManifestError(ValueError):
    """Every problem found in a manifest, one line each, naming row, patient and column."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.problems = problems
        self.path = Path(path)
        super().__init__(f"manifest {path}: {len(problems)} problem(s)\n  - " + "\n  - ".join(problems))
