"""Release commands: ``register-model {variant}`` (workflow rule) and ``promote NAME`` (a person's call)."""

from __future__ import annotations

import argparse
import json

from hemexp.core.commands import add_config_arg, config_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register-model", help="register one diffusion variant (with VAE, statistics, classifier, "
                                              "OOD envelope, template, config and model card) as an MLflow model "
                                              "-> results/release/{variant}/, alias @candidate")
    p.add_argument("variant", help="a name from diffusion.variants")
    add_config_arg(p)
    p.set_defaults(func=_register)

    p = sub.add_parser("promote", help="point an alias (default @champion) at a registered version, after "
                                       "reading its model card and the study")
    p.add_argument("name", help="registered model name, e.g. hemexp-2D-ice")
    p.add_argument("--version", default=None, help="version to promote (default: the one @--from names)")
    p.add_argument("--from", dest="from_alias", default="candidate", help="alias naming the version (default candidate)")
    p.add_argument("--alias", default="champion", help="alias to set (default champion)")
    add_config_arg(p)
    p.set_defaults(func=_promote)


def _register(args: argparse.Namespace) -> int:
    from hemexp.core.config import unknown_variant
    from hemexp.core.layout import Layout
    from hemexp.release.register import register_variant

    cfg = config_from(args)
    if problem := unknown_variant(cfg, args.variant, "register-model"):
        raise SystemExit(problem)
    record = register_variant(cfg, args.variant)
    print(f"registered {record['name']} version {record['version']} (@candidate) -> "
          f"{Layout.of(cfg).release_dir(args.variant)}; use --models models:/{record['name']}@candidate")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from hemexp.release.register import promote

    decided = promote(config_from(args), args.name, args.version, args.from_alias, args.alias)
    print(f"{decided['name']} version {decided['version']} is now @{decided['alias']}")
    print(json.dumps({"tags": decided["tags"], "evaluation_metrics": decided["metrics"]}, indent=2, sort_keys=True))
    return 0
