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

from hemexp import __version__
from hemexp.core.config import ConfigError
from hemexp.core.errors import ManifestError
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
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        result = args.func(args)
    except (ConfigError, ManifestError) as err:
        print(f"hemexp {args.command}: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
