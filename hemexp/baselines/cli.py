"""nnU-Net baseline commands: nnunet-env, nnunet-export, nnunet-plan, nnunet-train, nnunet-predict,
nnunet-masks.

nnU-Net runs in its own environment (see :mod:`hemexp.baselines.nnunet.run`); these commands run in HemExp's and
call nnU-Net's CLI as subprocesses, so none of them imports nnunetv2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from hemexp.core.commands import add_config_arg, config_from, patient_stage, report_failure
from hemexp.core.layout import Layout


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nnunet-env", help="create or complete nnU-Net's own virtualenv (.venv-nnunet)")
    p.add_argument("--venv", default=None, help="virtualenv folder (default: config nnunet.venv)")
    p.add_argument("--python", default="python3.11", help="interpreter that creates it")
    add_config_arg(p)
    p.set_defaults(func=_env)

    p = sub.add_parser("nnunet-export", help="export the training split as nnU-Net v2 raw dataset (imagesTr/labelsTr)")
    add_config_arg(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("nnunet-export-test", help="export one test patient into the dataset's imagesTs")
    p.add_argument("patient")
    add_config_arg(p)
    p.set_defaults(func=_export_test)

    p = sub.add_parser("nnunet-plan", help="nnUNetv2_plan_and_preprocess (2d, 3d_fullres) + the CV split")
    add_config_arg(p)
    p.set_defaults(func=_plan)

    p = sub.add_parser("nnunet-train", help="nnUNetv2_train one configuration and fold")
    p.add_argument("configuration", choices=["2d", "3d_fullres"])
    p.add_argument("fold", help="0-4 or all")
    add_config_arg(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("nnunet-predict", help="nnUNetv2_predict one test patient with the configured folds")
    p.add_argument("configuration", choices=["2d", "3d_fullres"])
    p.add_argument("patient")
    add_config_arg(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("nnunet-masks", help="one patient's nnU-Net prediction as iph/ivh masks on the model grid")
    p.add_argument("baseline", choices=["nnunet_2d", "nnunet_3d"])
    p.add_argument("patient")
    add_config_arg(p)
    p.set_defaults(func=_masks)


def _env_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a failed nnU-Net environment or tool in one line (its own output is already in the log)."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from hemexp.baselines.nnunet.run import NnunetEnvError

        try:
            return func(args)
        except NnunetEnvError as err:
            print(f"hemexp {args.command}: {err}", file=sys.stderr)
            return 1

    return run


@_env_errors
def _env(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hemexp.baselines.nnunet.run import create_venv, venv_path

    venv = Path(args.venv) if args.venv else venv_path(config_from(args))
    bin_dir = create_venv(venv, python=args.python)
    print(f"nnU-Net environment ready: {bin_dir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from hemexp.baselines.nnunet.dataset import export_training, layout
    from hemexp.cohort.patients import patients
    from hemexp.core.errors import clear_failure

    cfg = config_from(args)
    train = [p.patient_id for p in patients(cfg) if p.split == "train"]
    errors = export_training(cfg, train)
    for err in errors:
        report_failure(cfg, "nnunet-export", err)
    if errors:
        return 1
    for pid in train:
        clear_failure(cfg["results_dir"], "nnunet-export", pid)
    print(f"exported {len(train)} training patients to {layout(cfg).raw_dataset}")
    return 0


@patient_stage("nnunet-export-test")
def _export_test(args: argparse.Namespace, cfg: dict) -> None:
    from hemexp.baselines.nnunet.dataset import export_heldout_case

    for path in export_heldout_case(cfg, args.patient):
        print(path)


@_env_errors
def _plan(args: argparse.Namespace) -> int:
    from hemexp.baselines.nnunet.run import plan
    from hemexp.cohort.patients import patients

    cfg = config_from(args)
    out = plan(cfg, [p.patient_id for p in patients(cfg) if p.split == "train"])
    print(f"planned and preprocessed: {out}")
    return 0


@_env_errors
def _train(args: argparse.Namespace) -> int:
    from hemexp.baselines.nnunet.run import train

    fold: int | str = int(args.fold) if args.fold.isdigit() else args.fold
    if fold not in (0, 1, 2, 3, 4, "all"):
        raise SystemExit(f"hemexp nnunet-train: fold must be 0-4 or all, got {args.fold!r}")
    out = train(config_from(args), args.configuration, fold)
    print(f"trained: {out}")
    return 0


@_env_errors
def _predict(args: argparse.Namespace) -> int:
    from hemexp.baselines.nnunet.run import predict

    print(f"predicted: {predict(config_from(args), args.configuration, args.patient)}")
    return 0


@patient_stage("nnunet-masks")
def _masks(args: argparse.Namespace, cfg: dict) -> None:
    from hemexp.baselines.nnunet.dataset import (
        BASELINE_CONFIGURATIONS,
        layout,
        prediction_to_masks,
    )

    configuration = BASELINE_CONFIGURATIONS[args.baseline]
    counts = prediction_to_masks(
        args.patient,
        layout(cfg).prediction(configuration, args.patient),
        Layout.of(cfg).preprocessed(args.patient) / "bl_ct.nii.gz",
        Layout.of(cfg).baseline_masks(args.baseline, args.patient),
    )
    print(f"{args.baseline} {args.patient}: voxels {counts}")
