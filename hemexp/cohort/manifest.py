"""Cohort definitions shared by every stage: clinical variables, the expansion rule, the manifest.

The manifest is the one entry point for patient data (the synthetic cohort writes one too), so its
validation reports *every* bad row at once, naming row, patient and column: a research coordinator
fixing a 500-row TSV should not have to rerun the workflow once per typo.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from hemexp.core.clinical import CLINICAL_BY_NAME, CLINICAL_NAMES, VALID_RANGES
from hemexp.core.errors import ManifestError

IMAGE_COLUMNS = ("baseline_ct", "followup_ct", "baseline_iph", "baseline_ivh", "followup_iph", "followup_ivh")
REQUIRED_COLUMNS = ("patient_id", "site", "split", *IMAGE_COLUMNS, *CLINICAL_NAMES)
OPTIONAL_COLUMNS = ("expansion", "he_prob")
SPLITS = ("train", "test")


def read_manifest(path: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest TSV; image paths are resolved relative to the manifest's folder.

    Raises :class:`ManifestError` listing every problem at once.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [f"file not found: {path}"])
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    problems = validate_manifest_frame(df, base_dir=path.parent, check_files=check_files)
    if problems:
        raise ManifestError(path, problems)
    return normalise_manifest(df, path.parent)


def validate_manifest_frame(df: pd.DataFrame, base_dir: Path, check_files: bool = True) -> list[str]:
    """Return one message per problem; an empty list means the manifest is usable.

    Rows are plain dicts and files are checked with ``os.path`` on strings: a 10,000-patient manifest
    is validated every time the workflow starts, where per-row pandas Series cost seconds.
    """
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing_cols:
        return [f"missing column(s): {', '.join(missing_cols)}"]
    problems: list[str] = []
    counts = df["patient_id"].value_counts().to_dict()
    files = _Files(base_dir)
    for i, row in zip(df.index, df.to_dict("records"), strict=True):
        where = f"row {i + 2} (patient {row['patient_id'] or '<empty>'})"  # +2: header line, 1-based
        problems += _row_problems(row, where, files, check_files, counts)
    return problems


def _row_problems(row: dict[str, str], where: str, files: _Files, check_files: bool,
                  counts: dict[str, int]) -> list[str]:
    out: list[str] = []
    pid = row["patient_id"].strip()
    if not pid:
        out.append(f"{where}, column patient_id: empty")
    elif counts[row["patient_id"]] > 1:
        out.append(f"{where}, column patient_id: duplicate ID {pid!r}")
    elif not all(c.isalnum() or c in "-_" for c in pid):
        out.append(f"{where}, column patient_id: {pid!r} may contain only letters, digits, '-' and '_'")
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


def normalise_manifest(df: pd.DataFrame, base_dir: Path) -> pd.DataFrame:
    """Typed copy: clinical columns as floats, image paths absolute, optional columns present."""
    out = df.copy()
    out["patient_id"] = out["patient_id"].str.strip()
    files = _Files(base_dir)
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

    @staticmethod
    def _plain(value: str) -> bool:
        return not value.endswith("/") and os.path.basename(value) not in ("", ".", "..")

    def exists(self, value: str) -> bool:
        if not self._plain(value):
            return (self.base_dir / value).exists()
        return os.path.exists(os.path.join(self.base, value))

    def resolve(self, value: str) -> str:
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
    df.to_csv(tmp, sep="\t", index=False)
    tmp.replace(path)


def manifest_row_hashes(manifest: str | Path) -> dict[str, str]:
    """patient -> short hash of its manifest row: the workflow passes it as a rule ``params`` entry,
    so editing one patient's row (clinical values, split) reruns only that patient's jobs."""
    df = read_manifest(manifest, check_files=False)
    return {r["patient_id"]: hashlib.sha256(r.to_json().encode()).hexdigest()[:12] for _, r in df.iterrows()}
