"""Table writers every stage shares: GitHub Markdown, CSV, a small HTML page, float rounding.

One implementation so that Table 1, Table 2, the VAE fidelity table, adherence, calibration, the
guidance study and ``hemexp compare`` lay tables out alike, and so that a fix (escaping, rounding)
reaches every report at once. No ``tabulate`` dependency: the tables are small and a pipe table is
a few lines. Every file is written atomically (:func:`hemexp.core.files.atomic_path`), so a killed
job never leaves a half-written table behind.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from hemexp.core.files import atomic_path

HTML_STYLE = ("body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse;margin:8px 0}"
              "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
              "pre{white-space:pre-wrap}")


def markdown_table(table: pd.DataFrame, index: bool = False) -> str:
    """GitHub-flavoured pipe table; cells are ``str(value)`` (format them first, e.g. :func:`fmt_floats`).

    ``index=True`` adds the index as the first column, headed by the index name (Table 1's
    characteristics, the fields of ``hemexp compare``).
    """
    cols = [str(c) for c in table.columns]
    rows = [[str(v) for v in row] for row in table.itertuples(index=False)]
    if index:
        cols = [str(table.index.name), *cols]
        rows = [[str(idx), *row] for idx, row in zip(table.index, rows, strict=True)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_floats(frame: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Float columns as strings with ``digits`` significant digits, NaN as ``-``, for Markdown.

    A copy: CSV and JSON keep full precision, only the human-readable table is rounded.
    """
    out = frame.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].map(lambda v: "-" if pd.isna(v) else f"{v:.{digits}g}")
    return out


def write_csv(frame: pd.DataFrame, path: str | Path, index: bool = False, float_format: str | None = None) -> None:
    """``frame`` as CSV (no index unless asked: most tables are tidy rows), written atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index, float_format=float_format)


def write_html(path: str | Path, title: str, sections: Sequence[tuple[str, pd.DataFrame]],
               notes: Sequence[str] = ()) -> None:
    """Small self-contained HTML page of tables (Snakemake's report shows HTML inline, Markdown not).

    ``sections`` are (heading, frame) pairs (an empty heading adds none); floats show 3 significant
    digits and NaN as ``-``; each non-empty note becomes a preformatted block below the tables.
    """
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{HTML_STYLE}</style></head><body><h2>{html.escape(title)}</h2>"]
    for heading, frame in sections:
        if heading:
            parts.append(f"<h3>{html.escape(heading)}</h3>")
        parts.append(frame.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.3g}", border=0))
    parts += [f"<pre>{html.escape(n)}</pre>" for n in notes if n]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(parts) + "</body></html>\n")
