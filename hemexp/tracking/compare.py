"""Side-by-side comparison of MLflow runs (``hemexp compare``).

MLflow's UI compares runs too, but a cluster login node often has no browser, and a table in the
terminal (or pasted into a lab notebook as Markdown) is what one wants after a sweep. Runs are found
with :func:`mlflow.search_runs` (its filter grammar: ``tags.stage='diffusion' and params.seed='0'``),
so this module only selects columns and lays them out: one column per run, one row per tag, param
or metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from hemexp.core.tables import markdown_table

# Tags every HemExp run carries (hemexp.tracking.runs.run_tags); shown first so runs are identifiable.
IDENTITY_TAGS = ("stage", "variant", "config_hash", "data_version", "git_commit")


def search(tracking_uri: str, experiments: Sequence[str], filter_string: str = "",
           max_runs: int = 50) -> pd.DataFrame:
    """Runs of the named experiments matching ``filter_string``, newest first (MLflow's frame)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=list(experiments), filter_string=filter_string,
                              max_results=max_runs, order_by=["attributes.start_time DESC"])
    return runs if isinstance(runs, pd.DataFrame) else pd.DataFrame()


def _columns(runs: pd.DataFrame, prefix: str, names: Sequence[str] | None, only_varying: bool) -> list[str]:
    """``prefix.name`` columns to show: the requested ones (missing names kept, shown empty), or all
    present, restricted to those that differ between runs when ``only_varying``."""
    if names:
        return [f"{prefix}.{n}" for n in names]
    cols = sorted(c for c in runs.columns if c.startswith(prefix + "."))
    if only_varying and len(runs) > 1:
        cols = [c for c in cols if runs[c].astype(str).nunique(dropna=False) > 1]
    return cols


def run_label(row: pd.Series) -> str:
    """Column header of one run: its name (or short id) and the first 8 characters of its id."""
    name = row.get("tags.mlflow.runName")
    short = str(row["run_id"])[:8]
    return f"{name} ({short})" if isinstance(name, str) and name else short


def comparison_table(runs: pd.DataFrame, params: Sequence[str] | None = None,
                     metrics: Sequence[str] | None = None, all_params: bool = False) -> pd.DataFrame:
    """Rows = identity tags, params, metrics; columns = runs. Without ``params``, only params that
    differ between the runs are shown (the whole config is logged, so all of it would drown the
    difference); ``all_params`` shows every one."""
    if runs.empty:
        return pd.DataFrame()
    rows = [f"tags.{t}" for t in IDENTITY_TAGS if f"tags.{t}" in runs.columns]
    rows += _columns(runs, "params", params, only_varying=not all_params)
    rows += _columns(runs, "metrics", metrics, only_varying=False)
    table = pd.DataFrame({run_label(r): [_cell(r.get(c)) for c in rows] for _, r in runs.iterrows()}, index=rows)
    table.index.name = "field"
    return table


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render(table: pd.DataFrame, fmt: str = "text") -> str:
    """The table as aligned text, a Markdown pipe table, or CSV."""
    if table.empty:
        return "no matching runs\n"
    if fmt == "csv":
        return table.to_csv()
    if fmt == "markdown":
        return markdown_table(table, index=True)
    return table.to_string() + "\n"
