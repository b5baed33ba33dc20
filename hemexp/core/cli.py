"""``hemexp validate-config``: check a config file against the schema and the cross-key rules."""

from __future__ import annotations

import argparse

from hemexp.core.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate-config", help="validate a config file against the schema")
    p.add_argument("config", nargs="?", default=None, help="config YAML (default: config/config.yaml)")
    p.set_defaults(func=_validate_config)


def _validate_config(args: argparse.Namespace) -> int:
    load_config(args.config)
    print(f"{args.config or 'config/config.yaml'}: valid")
    return 0
