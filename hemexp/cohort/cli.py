"""Cohort commands: ``validate-manifest``, ``cohort-table`` (paper Table 1) and ``synth`` (the synthetic
ground-truth ICH cohort: raw DICOM/NIfTI, manifest, truth)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hemexp.core.commands import add_config_arg, config_from


def register(sub: argparse._SubParsersAction) -> None:
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

    p = sub.add_parser("synth", help="simulate the synthetic cohort under <results_dir>/raw")
    add_config_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    p.set_defaults(func=_synth)


def _validate_manifest(args: argparse.Namespace) -> int:
    from hemexp.cohort.manifest import read_manifest
    from hemexp.core.files import write_json

    df = read_manifest(args.manifest, check_files=not args.no_files)
    summary = {
        "n_patients": len(df),
        "per_split": df["split"].value_counts().sort_index().to_dict(),
        "per_site": df["site"].value_counts().sort_index().to_dict(),
    }
    if args.out:
        write_json(args.out, summary)
    print(f"{Path(args.manifest).name}: {len(df)} patients, valid ({summary['per_split']})")  # no folders
    return 0


def _cohort_table(args: argparse.Namespace) -> int:
    from hemexp.cohort.manifest import read_manifest
    from hemexp.cohort.table1 import cohort_frame, table1, to_markdown
    from hemexp.core.files import atomic_path
    from hemexp.core.tables import write_csv

    labels = config_from(args)["cohort"]["mask_labels"]
    table = table1(cohort_frame(read_manifest(args.manifest), labels))
    write_csv(table, args.csv, index=True)
    with atomic_path(args.md) as tmp:
        Path(tmp).write_text(to_markdown(table))
    print(to_markdown(table))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from hemexp.cohort.synth.cohort import CohortCheckError, synthesize

    cfg = config_from(args)
    try:
        truth = synthesize(cfg, progress=not args.no_progress)
    except CohortCheckError as err:
        print(f"hemexp synth: {err}", file=sys.stderr)
        return 2
    for split, s in truth["splits"].items():
        print(f"{split}: {s['n']} patients, {s['expanders']} expander(s) ({100 * s['fraction']:.0f} %)")
    print(f"synthesized in {truth['seconds']:.1f} s")
    return 0
