"""``hemexp synth``: simulate the synthetic ground-truth ICH cohort (raw DICOM/NIfTI, manifest, truth)."""

from __future__ import annotations

import argparse
import sys

from hemexp.commands.common import add_config_arg, config_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="simulate the synthetic cohort under <results_dir>/raw")
    add_config_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from hemexp.synth.cohort import CohortCheckError, synthesize

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
