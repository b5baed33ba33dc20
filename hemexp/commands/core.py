"""Config and cohort commands: validate-config, validate-manifest, cohort-table, failures."""

from __future__ import annotations

import argparse
from pathlib import Path

from hemexp.commands.common import add_config_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate-config", help="validate a config file against the schema")
    p.add_argument("config", nargs="?", default=None, help="config YAML (default: config/config.yaml)")
    p.set_defaults(func=_validate_config)

    p = sub.add_parser("validate-manifest", help="check a manifest TSV, reporting every bad row")
    p.add_argument("manifest")
    p.add_argument("--out", help="write a JSON summary (patients per split and site) here")
    p.add_argument("--no-files", action="store_true", help="skip the file-existence check")
    p.set_defaults(func=_validate_manifest)

    p = sub.add_parser("cohort-table", help="write the cohort table (paper Table 1) for a manifest")
    p.add_argument("manifest")
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    add_config_arg(p)
    p.set_defaults(func=_cohort_table)

    p = sub.add_parser("failures", help="gather per-patient failure records into qc/failures.tsv")
    p.add_argument("--results", default="results")
    p.set_defaults(func=_failures)


def _validate_config(args: argparse.Namespace) -> int:
    from hemexp.config import load_config

    load_config(args.config)
    print(f"{args.config or 'config/config.yaml'}: valid")
    return 0


def _validate_manifest(args: argparse.Namespace) -> int:
    from hemexp.cohort import read_manifest
    from hemexp.utils import write_json

    df = read_manifest(args.manifest, check_files=not args.no_files)
    summary = {
        "n_patients": len(df),
        "per_split": df["split"].value_counts().sort_index().to_dict(),
        "per_site": df["site"].value_counts().sort_index().to_dict(),
    }
    if args.out:
        write_json(args.out, summary)
    print(f"{args.manifest}: {len(df)} patients, valid ({summary['per_split']})")
    return 0


def _cohort_table(args: argparse.Namespace) -> int:
    from hemexp.cohort import read_manifest
    from hemexp.cohort_table import cohort_frame, table1, to_markdown
    from hemexp.config import load_config
    from hemexp.utils import atomic_path

    labels = load_config(args.config)["cohort"]["mask_labels"]
    table = table1(cohort_frame(read_manifest(args.manifest), labels))
    with atomic_path(args.csv) as tmp:
        table.to_csv(tmp)
    with atomic_path(args.md) as tmp:
        Path(tmp).write_text(to_markdown(table))
    print(to_markdown(table))
    return 0


def _failures(args: argparse.Namespace) -> int:
    from hemexp.errors import collect_failures

    table = collect_failures(args.results)
    if len(table):
        print(f"{len(table)} failure(s); see {Path(args.results) / 'qc' / 'failures.tsv'}")
        print(table.to_string(index=False))
    return 0
