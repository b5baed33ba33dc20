"""The ``hemexp`` command line: one subcommand per pipeline stage.

Each stage registers its subcommands from its own ``hemexp/<stage>/cli.py``, and imports its
heavy dependencies (torch, ANTs) only when run, so ``hemexp --help`` and the cheap stages stay fast.
This module only parses arguments and dispatches; no stage logic lives here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from hemexp import __version__
from hemexp.core.commands import USAGE_ERRORS, check_patient_args, usage_message
from hemexp.core.errors import PatientInputError, ProductError
from hemexp.core.runtime import setup_logging

# Stage modules, in pipeline order; each exposes ``register(subparsers)``.
COMMAND_MODULES = (
    "hemexp.core.cli",
    "hemexp.cohort.cli",
    "hemexp.preprocess.cli",
    "hemexp.vae.cli",
    "hemexp.diffusion.cli",
    "hemexp.sampling.cli",
    "hemexp.evaluation.cli",
    "hemexp.baselines.cli",
    "hemexp.release.cli",
    "hemexp.tracking.cli",
    "hemexp.workflow.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hemexp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hemexp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # stage not installed in this build; others still work
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code is 0 (done), 1 (a per-patient input error: bad scan, missing
    file, ...; recorded for ``qc/failures.tsv`` by the per-patient commands) or 2 (a usage, config or
    manifest error, or a patient ID no manifest could hold). Either error is one message naming the
    file and the problem, with its traceback only under ``hemexp -v``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors (argparse printed the message)
        return stop.code if isinstance(stop.code, int) else 2
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        check_patient_args(args)
        result = args.func(args)
    except USAGE_ERRORS as err:
        return _report(args, usage_message(err), 2)  # de-identified
    except PatientInputError as err:  # from a command without a failure record (no patient_stage)
        return _report(args, str(err.shareable()), 1)
    except ProductError as err:  # a truncated/corrupt intermediate product: names the stage to rerun
        return _report(args, str(err), 1)
    except OSError as err:  # a file the command was pointed at: unwritable --out, disk full, ...
        return _report(args, f"{usage_message(err)} (rerun with `hemexp -v` for the traceback)", 1)
    except KeyboardInterrupt:
        print(f"hemexp {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _report(args: argparse.Namespace, message: str, code: int) -> int:
    if args.verbose:
        traceback.print_exc()
    print(f"hemexp {args.command}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
