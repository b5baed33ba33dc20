"""Cohort definitions shared by every stage: clinical variables, the expansion rule, the manifest.

The manifest is the one entry point for patient data (the synthetic cohort writes one too), so its
validation reports *every* bad row at once, naming row, patient and column: a research coordinator
fixing a 500-row TSV should not have to rerun the workflow once per typo. A file that is not a table
at all (empty, not UTF-8, a repeated or missing column, a row with too many fields) is reported the
same way, as a :class:`ManifestError`, never as a parser traceback. Patient IDs are normalised
(:func:`hemexp.core.ids.normalise_patient_id`) before any check, so a full-width or padded copy of an
ID counts as a duplicate, and must satisfy :func:`hemexp.core.ids.patient_id_problem`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from hemexp.core.clinical import CLINICAL_BY_NAME, CLINICAL_NAMES, VALID_RANGES
from hemexp.core.errors import ManifestError
from hemexp.core.ids import normalise_patient_id, patient_id_problem

IMAGE_COLUMNS = ("baseline_ct", "followup_ct", "baseline_iph", "baseline_ivh", "followup_iph", "followup_ivh")
CT_COLUMNS = ("baseline_ct", "followup_ct")
MASK_COLUMNS = tuple(c for c in IMAGE_COLUMNS if c not in CT_COLUMNS)
REQUIRED_COLUMNS = ("patient_id", "site", "split", *IMAGE_COLUMNS, *CLINICAL_NAMES)
OPTIONAL_COLUMNS = ("expansion", "he_prob")
SPLITS = ("train", "test")


def read_manifest(path: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest TSV; image paths are resolved relative to the manifest's folder.

    Raises :class:`ManifestError` listing every problem at once.
    """
    path = Path(path)
    df = read_manifest_table(path)
    files = _Files(path.parent)  # one path cache for validation and normalisation
    problems = validate_manifest_frame(df, base_dir=path.parent, check_files=check_files, files=files)
    if problems:
        raise ManifestError(path, problems)
    return normalise_manifest(df, path.parent, files=files)


def read_manifest_table(path: Path) -> pd.DataFrame:
    """The manifest as a table of strings (header names stripped, one row per non-blank line), or a
    :class:`ManifestError` saying why the file is not a tab-separated table.

    The index is the row's line number minus 2, so ``row {index + 2}`` in messages is the line a
    spreadsheet or editor shows. Trailing empty fields (a trailing tab) are ignored; a short row is
    padded with empty values (each missing required value is then reported by its column).
    """
    if path.is_dir():
        raise ManifestError(path, [f"{path} is a folder; give the manifest TSV file"])
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(path, [f"file not found: {path}"]) from None
    except OSError as err:
        raise ManifestError(path, [f"cannot read {path}: {err.strerror or err}"]) from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's 'UTF-8 with BOM') is not part of the header
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ManifestError(path, [f"line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the "
                                   "manifest as UTF-8 tab-separated text"]) from None
    if not text.strip():
        raise ManifestError(path, ["file is empty; expected a tab-separated header line (patient_id, site, "
                                   "split, ...) and one row per patient"])
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", strict=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    problems: list[str] = []
    try:
        for fields in reader:
            while fields and not fields[-1].strip():  # trailing tabs
                fields.pop()
            if not fields:
                continue
            if header is None:
                header = [f.strip() for f in fields]
                problems += _header_problems(header)
                continue
            if len(fields) > len(header):
                problems.append(f"row {reader.line_num}: {len(fields)} tab-separated fields but the header has "
                                f"{len(header)} columns (a stray tab, or a value holding a tab?)")
                continue
            rows.append(fields + [""] * (len(header) - len(fields)))
            lines.append(reader.line_num)
    except csv.Error as err:
        problems.append(f"line {reader.line_num}: not a tab-separated table ({err}; an unclosed '\"'?)")
    if problems:
        raise ManifestError(path, problems)
    assert header is not None  # the text is not blank, so some line has a field
    if not rows:
        raise ManifestError(path, ["no patient rows below the header; add one row per patient"])
    return pd.DataFrame(rows, columns=header, index=[n - 2 for n in lines], dtype=str)


def _header_problems(header: list[str]) -> list[str]:
    out = []
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(header, start=1):
        if not name:
            out.append(f"header: column {i} has no name")
        else:
            seen.setdefault(name, []).append(i)
    for name, where in seen.items():
        if len(where) > 1:
            out.append(f"header: column {name!r} appears {len(where)} times (columns "
                       f"{', '.join(map(str, where))}); keep one")
    return out


def validate_manifest_frame(df: pd.DataFrame, base_dir: Path, check_files: bool = True,
                            files: _Files | None = None) -> list[str]:
    """Return one message per problem; an empty list means the manifest is usable.

    Rows are plain dicts and files are checked with ``os.path`` on strings: a 10,000-patient manifest
    is validated every time the workflow starts, where per-row pandas Series cost seconds.
    """
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing_cols:
        hint = ""
        if len(df.columns) < 3 and any("," in c or ";" in c for c in df.columns):
            hint = " (the header has no tabs: the manifest must be tab-separated, not comma-separated)"
        return [f"missing column(s): {', '.join(missing_cols)}{hint}"]
    if df.empty:
        return ["no patient rows below the header; add one row per patient"]
    problems: list[str] = []
    files = files or _Files(base_dir)
    records = df.to_dict("records")
    ids = [normalise_patient_id(r["patient_id"]) for r in records]
    rows = [i + 2 for i in df.index]  # +2: header line, 1-based
    same_id = _rows_by(ids, rows, key=lambda pid: pid)
    same_case = _rows_by(ids, rows, key=str.casefold)
    ct_owner: dict[str, tuple[int, str, str]] = {}  # resolved CT path -> (row, patient, column)
    for row, pid, rec in zip(rows, ids, records, strict=True):
        where = f"row {row} (patient {pid or '<empty>'})"
        problems += _id_problems(pid, rec["patient_id"], row, where, same_id, same_case)
        problems += _row_problems(rec, where, files, check_files)
        problems += _same_file_problems(rec, row, pid, where, files, ct_owner)
    return problems


def _rows_by(ids: list[str], rows: list[int], key) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for pid, row in zip(ids, rows, strict=True):
        if pid:
            out.setdefault(key(pid), []).append(row)
    return out


def _id_problems(pid: str, raw: str, row: int, where: str, same_id: dict[str, list[int]],
                 same_case: dict[str, list[int]]) -> list[str]:
    col = f"{where}, column patient_id"
    if not pid:
        return [f"{col}: empty"]
    shown = f"{pid!r}" if pid == raw.strip() else f"{pid!r} (written {raw.strip()!r}; IDs are compared after Unicode NFKC)"
    if len(same_id[pid]) > 1:
        others = ", ".join(str(r) for r in same_id[pid] if r != row)
        return [f"{col}: duplicate ID {shown}, also in row(s) {others}; each patient needs one row and a unique ID"]
    problem = patient_id_problem(pid)
    if problem:
        return [f"{col}: {problem}"]
    if len(same_case[pid.casefold()]) > 1:
        others = ", ".join(str(r) for r in same_case[pid.casefold()] if r != row)
        return [f"{col}: {shown} differs only in letter case from the ID in row(s) {others} (on a case-"
                "insensitive file system both would write the same files); make the IDs differ"]
    return []


def _row_problems(row: dict[str, str], where: str, files: _Files, check_files: bool) -> list[str]:
    out: list[str] = []
    if row["split"] not in SPLITS:
        out.append(f"{where}, column split: {row['split']!r} is not a known split (allowed: {', '.join(SPLITS)})")
    if not row["site"].strip():
        out.append(f"{where}, column site: empty")
    for col in IMAGE_COLUMNS:
        value = row[col].strip()
        if not value:
            out.append(f"{where}, column {col}: missing")
        elif check_files and not files.exists(value):
            out.append(f"{where}, column {col}: file not found: {files.base_dir / value}")
    for name in CLINICAL_NAMES:
        out += _clinical_problems(row[name], name, where)
    if "expansion" in row and row["expansion"].strip() not in ("", "0", "1"):
        out.append(f"{where}, column expansion: {row['expansion']!r} must be 0, 1 or empty")
    if "he_prob" in row and row["he_prob"].strip():
        p = _as_float(row["he_prob"])
        if p is None or not 0.0 <= p <= 1.0:
            out.append(f"{where}, column he_prob: {row['he_prob']!r} must be a probability in [0, 1]")
    return out


def _same_file_problems(row: dict[str, str], line: int, pid: str, where: str, files: _Files,
                        ct_owner: dict[str, tuple[int, str, str]]) -> list[str]:
    """Two columns naming one file (after resolving links and '..'), where that cannot be right: the
    baseline and follow-up CT, a mask and a CT, or one patient's CT and another's. (IPH and IVH may
    share a file: that is a label map, see ``cohort.mask_labels``.)"""
    resolved = {c: files.resolve(row[c].strip()) for c in IMAGE_COLUMNS if row[c].strip()}
    out: list[str] = []
    bl, fu = resolved.get("baseline_ct"), resolved.get("followup_ct")
    if bl is not None and bl == fu:
        out.append(f"{where}, columns baseline_ct and followup_ct: both name the file {row['followup_ct'].strip()!r}; "
                   "the follow-up CT must be the later scan")
    for mask in MASK_COLUMNS:
        for ct in CT_COLUMNS:
            if mask in resolved and resolved[mask] == resolved.get(ct):
                out.append(f"{where}, column {mask}: names the CT file of column {ct} ({row[mask].strip()!r}); "
                           "give the mask file")
    for ct in CT_COLUMNS:
        if ct not in resolved or (ct == "followup_ct" and fu == bl):
            continue
        owner = ct_owner.setdefault(resolved[ct], (line, pid, ct))
        if owner[0] != line and owner[1] != pid:  # (rows of one duplicated ID: already reported)
            out.append(f"{where}, column {ct}: {row[ct].strip()!r} is also the {owner[2]} of row {owner[0]} "
                       f"(patient {owner[1] or '<empty>'}); each scan belongs to one patient")
    return out


def _as_float(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _clinical_problems(text: str, name: str, where: str) -> list[str]:
    if not str(text).strip():
        return [f"{where}, column {name}: missing value"]
    value = _as_float(text)
    low, high = VALID_RANGES[name]
    if value is None:
        return [f"{where}, column {name}: {text!r} is not a number"]
    if CLINICAL_BY_NAME[name].binary and value not in (0.0, 1.0):
        return [f"{where}, column {name}: {text!r} must be 0 or 1"]
    if not low <= value <= high:
        return [f"{where}, column {name}: {value:g} out of range [{low:g}, {high:g}]"]
    return []


def normalise_manifest(df: pd.DataFrame, base_dir: Path, files: _Files | None = None) -> pd.DataFrame:
    """Typed copy: IDs normalised, clinical columns as floats, image paths absolute, optional columns present."""
    out = df.copy()
    out["patient_id"] = [normalise_patient_id(v) for v in out["patient_id"]]
    files = files or _Files(base_dir)
    for col in IMAGE_COLUMNS:
        out[col] = [files.resolve(v.strip()) for v in out[col]]
    for name in CLINICAL_NAMES:
        out[name] = out[name].astype(float)
    out["expansion"] = pd.to_numeric(out["expansion"], errors="coerce") if "expansion" in out else np.nan
    out["he_prob"] = pd.to_numeric(out["he_prob"], errors="coerce") if "he_prob" in out else np.nan
    return out.sort_values("patient_id").reset_index(drop=True)


class _Files:
    """``(base_dir / value).exists()`` and ``str((base_dir / value).resolve())``, fast for big manifests.

    ``Path.resolve`` lstat()s every component of every path; a manifest names ~6 files in one folder
    per patient, so each folder is resolved once and only the file name is checked for a link, on
    plain strings. Anything unusual (a link, '.', '..', a trailing '/') takes the exact ``pathlib``
    route. Measured on 10,000 patients: validation + normalisation 21 s -> ~3 s.
    """

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.base = str(base_dir)
        self.resolved: dict[str, str] = {}
        self.values: dict[str, str] = {}  # value -> resolved path (validation and normalisation share it)

    @staticmethod
    def _plain(value: str) -> bool:
        return not value.endswith("/") and os.path.basename(value) not in ("", ".", "..")

    def exists(self, value: str) -> bool:
        if not self._plain(value):
            return (self.base_dir / value).exists()
        return os.path.exists(os.path.join(self.base, value))

    def resolve(self, value: str) -> str:
        if value not in self.values:
            self.values[value] = self._resolve(value)
        return self.values[value]

    def _resolve(self, value: str) -> str:
        joined = os.path.join(self.base, value)
        if not self._plain(value) or os.path.islink(joined):
            return str((self.base_dir / value).resolve())
        folder, name = os.path.split(joined)
        if folder not in self.resolved:
            self.resolved[folder] = str(Path(folder).resolve())
        return os.path.join(self.resolved[folder], name)


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Write a manifest TSV atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        df.to_csv(tmp, sep="\t", index=False)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written manifest beside the old one
        raise


def manifest_row_hashes(manifest: str | Path) -> dict[str, str]:
    """patient -> short hash of its manifest row: the workflow passes it as a rule ``params`` entry,
    so editing one patient's row (clinical values, split) reruns only that patient's jobs."""
    df = read_manifest(manifest, check_files=False)
    return {r["patient_id"]: hashlib.sha256(r.to_json().encode()).hexdigest()[:12] for _, r in df.iterrows()}
