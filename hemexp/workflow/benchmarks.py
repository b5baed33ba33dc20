"""Where a run's time goes: Snakemake's per-job ``benchmark:`` records gathered into one per-rule table.

Every rule writes ``benchmarks/<rule>/<job>.tsv`` (``Layout.benchmark``), Snakemake's own record of
the job's wall time, CPU time and peak memory. :func:`collect_rule_times` sums them per rule into
``benchmarks/rule_times.tsv`` and an RST table the report includes, so a slow demo or cluster run
shows which rules to speed up first. Records of every job that ever ran are kept (a job rerun after
a change overwrites its own record), so the table describes the products on disk, not one invocation.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hemexp.core.files import atomic_path
from hemexp.core.layout import Layout
from hemexp.core.tables import markdown_table

COLUMNS = ("rule", "jobs", "total_s", "share_pct", "median_s", "max_s", "cpu_s", "max_rss_mb")


def read_records(benchmarks_dir: Path) -> pd.DataFrame:
    """One row per job record: rule, wall seconds, CPU seconds, peak RSS (MB); unreadable records skipped."""
    rows = []
    for path in sorted(benchmarks_dir.glob("*/**/*.tsv")):
        try:
            rec = pd.read_csv(path, sep="\t").iloc[-1]
        except (pd.errors.ParserError, pd.errors.EmptyDataError, IndexError, OSError):
            continue  # a job killed while Snakemake wrote its record: nothing to count
        rss = pd.to_numeric(rec.get("max_rss"), errors="coerce")
        rows.append({"rule": path.relative_to(benchmarks_dir).parts[0], "s": float(rec["s"]),
                     "cpu_s": float(pd.to_numeric(rec.get("cpu_time"), errors="coerce") or 0.0),
                     "max_rss_mb": float(rss) if pd.notna(rss) else float("nan")})
    return pd.DataFrame(rows, columns=["rule", "s", "cpu_s", "max_rss_mb"])


def rule_times(records: pd.DataFrame) -> pd.DataFrame:
    """Per-rule totals, slowest first, with each rule's share of the summed job time."""
    if records.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    grouped = records.groupby("rule")
    table = pd.DataFrame({
        "jobs": grouped.size(),
        "total_s": grouped["s"].sum(),
        "median_s": grouped["s"].median(),
        "max_s": grouped["s"].max(),
        "cpu_s": grouped["cpu_s"].sum(),
        "max_rss_mb": grouped["max_rss_mb"].max(),
    }).reset_index()
    total = float(table["total_s"].sum())
    table["share_pct"] = 100.0 * table["total_s"] / total if total > 0 else 0.0
    return table.sort_values("total_s", ascending=False)[list(COLUMNS)].reset_index(drop=True)


def collect_rule_times(results_dir: str | Path) -> pd.DataFrame:
    """Write ``benchmarks/rule_times.tsv`` and ``.rst`` (always, maybe empty) and return the table."""
    layout = Layout(Path(results_dir))
    table = rule_times(read_records(layout.benchmarks_dir))
    layout.rule_times_table.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.rule_times_table) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.2f")
    with atomic_path(layout.rule_times_rst) as tmp:
        tmp.write_text(rule_times_rst(table))
    return table


def rule_times_rst(table: pd.DataFrame) -> str:
    """The table as an RST literal block (the report includes it), or a line saying nothing ran."""
    if table.empty:
        return "No job has a benchmark record yet.\n"
    body = markdown_table(table.round(2))
    return "::\n\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "\n"
