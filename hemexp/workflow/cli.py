"""``hemexp failures``: gather the per-patient failure records into ``qc/failures.tsv`` (run by the
Snakefile's ``onsuccess``/``onerror`` handlers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hemexp.core.deid import shareable_path
from hemexp.core.errors import collect_failures
from hemexp.core.layout import Layout


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("failures", help="gather per-patient failure records into qc/failures.tsv")
    p.add_argument("--results", default="results")
    p.set_defaults(func=_failures)


def _failures(args: argparse.Namespace) -> int:
    table = collect_failures(args.results)
    if len(table):
        shown = shareable_path(Layout(Path(args.results)).failures_table, results_dir=args.results)
        print(f"{len(table)} failure(s); see {shown} in the results folder")
        print(table.to_string(index=False))
    return 0
