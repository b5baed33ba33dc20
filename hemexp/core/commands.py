"""Argument helpers shared by stage commands, and how the CLI and the workflow report bad input.

Bad input never escapes as a traceback: a config, manifest or usage error (:data:`USAGE_ERRORS`) is
one message naming the file (and row, patient, column or key) and exits 2; a per-patient input error
is recorded for the failure table and exits 1 (:func:`patient_stage`). Patient IDs from the command
line are checked before anything is read or written (:func:`check_patient_args`), so no ID such as
``../../x`` can place a failure record or any other file outside ``results_dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

from hemexp.core.config import ConfigError, load_config
from hemexp.core.deid import scrub_text
from hemexp.core.errors import ManifestError, PatientInputError, clear_failure, record_failure
from hemexp.core.ids import PatientIdError, check_patient_id, patient_id_problem
from hemexp.core.layout import manifest_path

# Errors of what the user gave (config, manifest, command line): one message, exit 2.
USAGE_ERRORS: tuple[type[Exception], ...] = (ConfigError, ManifestError, PatientIdError)
# argparse attributes that hold patient IDs (a positional `patient`, lists `--patients`, `--patient-id`).
PATIENT_ARGS = ("patient", "patients", "patient_id")


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config YAML (default: config/config.yaml)")


def config_from(args: argparse.Namespace) -> dict[str, Any]:
    """The command's config (``--config``); its patient-ID arguments are checked first."""
    check_patient_args(args)
    return load_config(args.config)


def check_patient_args(args: argparse.Namespace) -> None:
    """Raise :class:`PatientIdError` for any patient ID argument that no manifest could hold."""
    for name in PATIENT_ARGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        where = "patient ID" if name == "patient" else f"--{name.replace('_', '-')}"
        for pid in [value] if isinstance(value, str) else value:
            check_patient_id(pid, where=where)


def report_failure(cfg: dict[str, Any], stage: str, err: PatientInputError) -> None:
    """Record ``err`` for the failure table (only for a valid patient ID: never a record path from a
    bad one) and print it in one line on stderr, both de-identified (docs/deidentification.md: paths
    relative to the manifest's folder or results_dir, else file names)."""
    manifest_dir = manifest_path(cfg).parent
    if patient_id_problem(str(err.patient_id)) is None:
        record_failure(cfg["results_dir"], stage, err, manifest_dir)
    print(f"hemexp {stage}: {err.shareable(manifest_dir, cfg['results_dir'])}", file=sys.stderr)


def patient_stage(stage: str) -> Callable:
    """Decorate a per-patient command: a :class:`PatientInputError` is recorded for the failure
    table and reported in one clear line (exit 1); success clears a stale record. The patient ID is
    checked first (exit 2), so a record is only ever written for a valid ID, inside ``results_dir``."""

    def wrap(func: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            check_patient_args(args)
            cfg = config_from(args)
            try:
                func(args, cfg)
            except PatientInputError as err:
                report_failure(cfg, stage, err)
                return 1
            clear_failure(cfg["results_dir"], stage, args.patient)
            return 0

        return run

    return wrap


@contextlib.contextmanager
def exit_on_usage_error(prog: str, verbose: bool = False) -> Iterator[None]:
    """Turn a :data:`USAGE_ERRORS` exception into its message on stderr and ``SystemExit(2)``, with
    no traceback (unless ``verbose``). The Snakefile wraps its start-up checks in this, so a bad
    config or manifest stops the workflow with the message instead of a Python error location."""
    try:
        yield
    except USAGE_ERRORS as err:
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"{prog}: {usage_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def usage_message(err: Exception) -> str:
    """A usage error's message as shared output may show it (docs/deidentification.md): absolute paths
    relative to the manifest's folder for a :class:`ManifestError`, else file names. A rejected patient
    ID is shown as typed (it is the command line's text, not a path the data holds)."""
    if isinstance(err, PatientIdError):
        return str(err)
    root = err.path.parent if isinstance(err, ManifestError) else None
    return scrub_text(str(err), manifest_dir=root)
