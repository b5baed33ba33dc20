"""Experiment-tracking commands: ``hemexp compare`` (side-by-side table of MLflow runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hemexp.core.commands import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="side-by-side table of MLflow runs (tags, params, metrics)",
        description="Compare MLflow runs side by side. Example: hemexp compare --filter "
                    "\"tags.stage='diffusion'\" --params diffusion.min_snr_gamma --metrics val_loss",
    )
    add_config_arg(p)
    p.add_argument("--experiment", action="append", default=None,
                   help="experiment name (repeatable; default: tracking.experiment from the config)")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.stage='vae'\"")
    p.add_argument("--params", nargs="+", default=None,
                   help="params to show (dotted config keys); default: those that differ between runs")
    p.add_argument("--all-params", action="store_true", help="show every param, not only differing ones")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics to show (default: all)")
    p.add_argument("--max-runs", type=int, default=20, help="newest runs first, at most this many")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: MLFLOW_TRACKING_URI, else tracking.uri, else the results sqlite)")
    p.add_argument("--format", choices=("text", "markdown", "csv"), default="text")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from hemexp.core.config import load_config
    from hemexp.core.files import atomic_path
    from hemexp.tracking.compare import comparison_table, render, search
    from hemexp.tracking.runs import tracking_uri

    cfg = load_config(args.config)
    uri = args.tracking_uri or tracking_uri(cfg)
    runs = search(uri, args.experiment or [cfg["tracking"]["experiment"]], args.filter, args.max_runs)
    text = render(comparison_table(runs, args.params, args.metrics, args.all_params), args.format)
    print(text, end="")
    if args.out:
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(text)
    return 0 if not runs.empty else 1
