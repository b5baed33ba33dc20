"""Argument helpers shared by stage commands."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from hemexp.core.config import load_config
from hemexp.core.errors import PatientInputError, clear_failure, record_failure


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config YAML (default: config/config.yaml)")


def config_from(args: argparse.Namespace) -> dict[str, Any]:
    return load_config(args.config)


def patient_stage(stage: str) -> Callable:
    """Decorate a per-patient command: a :class:`PatientInputError` is recorded for the failure
    table and reported in one clear line (exit 1); success clears a stale record."""

    def wrap(func: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            cfg = config_from(args)
            try:
                func(args, cfg)
            except PatientInputError as err:
                record_failure(cfg["results_dir"], stage, err)
                print(f"hemexp {stage}: {err}", file=sys.stderr)
                return 1
            clear_failure(cfg["results_dir"], stage, args.patient)
            return 0

        return run

    return wrap
