"""Patient IDs: the one rule for what an ID may be, shared by the manifest check, every per-patient
command and the workflow's wildcard constraint.

An ID becomes a folder and file name under ``results_dir`` (``ingested/{p}/``,
``qc/failures/{stage}__{p}.json``), a Snakemake wildcard and a command-line argument, so it is ASCII
letters, digits, '-' and '_' only (no '/', '.', spaces or look-alike Unicode), does not begin with
'-' (``hemexp ingest -rf`` would read as an option) and is at most :data:`MAX_LENGTH` characters.
Manifest IDs are normalised first (:func:`normalise_patient_id`: Unicode NFKC, surrounding
whitespace stripped), so a full-width or padded copy of an ID is recognised as the same ID.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

MAX_LENGTH = 128  # keeps `<stage>__<id>.json` and `<id>.parquet` far below the 255-byte file-name limit
ALLOWED = "ASCII letters, digits, '-' and '_'"
# Snakemake wildcard constraint (rules/common.smk): exactly the IDs :func:`patient_id_problem` accepts.
PATIENT_ID_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_-]*"
_VALID = re.compile(PATIENT_ID_PATTERN)


def normalise_patient_id(text: str) -> str:
    """Unicode NFKC (full-width and compatibility forms -> plain) and surrounding whitespace removed."""
    return unicodedata.normalize("NFKC", str(text)).strip()


def patient_id_problem(pid: str) -> str | None:
    """Why ``pid`` cannot be a patient ID, or None when it can."""
    if not pid:
        return "'' is empty"
    if len(pid) > MAX_LENGTH:
        return f"{pid[:20]!r}... is {len(pid)} characters long (at most {MAX_LENGTH})"
    if _VALID.fullmatch(pid):
        return None
    bad = "".join(sorted({c for c in pid if not (c.isascii() and (c.isalnum() or c in "-_"))}))
    if bad:
        return f"{pid!r} contains {bad!r}; use only {ALLOWED}"
    return f"{pid!r} begins with '-' (it would read as a command-line option); begin with a letter, digit or '_'"


class PatientIdError(ValueError):
    """A patient ID given on the command line that no manifest could hold (a usage error: exit 2)."""

    def __init__(self, pid: str, problem: str, where: str = "patient ID"):
        self.patient_id = pid
        self.problem = problem
        super().__init__(f"{where} {problem} (IDs are the manifest's patient_id)")


def check_patient_id(pid: str, where: str = "patient ID") -> str:
    """Return ``pid`` unchanged, or raise :class:`PatientIdError` naming the problem."""
    problem = patient_id_problem(pid)
    if problem:
        raise PatientIdError(pid, problem, where)
    return pid


def check_patient_ids(pids: Iterable[str], where: str = "patient ID") -> list[str]:
    """:func:`check_patient_id` for each ID of a list (e.g. ``--patients``)."""
    return [check_patient_id(p, where) for p in pids]
