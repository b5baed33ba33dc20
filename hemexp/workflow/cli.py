"""Run bookkeeping, run by the Snakefile's ``onsuccess``/``onerror`` handlers: ``hemexp failures``
gathers the per-patient failure records into ``qc/failures.tsv``; ``hemexp rule-times`` sums the
per-job benchmark records into ``benchmarks/rule_times.tsv`` (where the run's time went)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hemexp.core.deid import shareable_path
from hemexp.core.errors import collect_failures
from hemexp.core.layout import Layout
from hemexp.workflow.benchmarks import collect_rule_times


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("failures", help="gather per-patient failure records into qc/failures.tsv")
    p.add_argument("--results", default="results")
    p.set_defaults(func=_failures)
    p = sub.add_parser("gather-index", help="list the training patients' files of one family in index/train_<family>.txt")
    p.add_argument("family", choices=Layout.INDEXED)
    p.add_argument("--config", default=None)
    p.set_defaults(func=_gather_index)
    p = sub.add_parser("rule-times", help="per-rule wall/CPU time and peak memory into benchmarks/rule_times.tsv")
    p.add_argument("--results", default="results")
    p.set_defaults(func=_rule_times)


def _failures(args: argparse.Namespace) -> int:
    table = collect_failures(args.results)
    if len(table):
        shown = shareable_path(Layout(Path(args.results)).failures_table, results_dir=args.results)
        print(f"{len(table)} failure(s); see {shown} in the results folder")
        print(table.to_string(index=False))
    return 0


def _gather_index(args: argparse.Namespace) -> int:
    from hemexp.core.commands import config_from
    from hemexp.workflow.index import write_index

    path, n = write_index(config_from(args), args.family)
    print(f"{n} training {args.family} files -> {path}")
    return 0


def _rule_times(args: argparse.Namespace) -> int:
    table = collect_rule_times(args.results)
    if len(table):
        print(f"time by rule ({table['jobs'].sum()} jobs, {table['total_s'].sum():.0f} s of job time):")
        print(table.head(8).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return 0
