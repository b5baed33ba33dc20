"""Preprocessing commands: ingest, build-template, preprocess, shard (one patient per call, but the template).

Each per-patient command is wrapped by :func:`hemexp.core.commands.patient_stage`, so bad input is
recorded for ``results/qc/failures.tsv`` and exits 1 with one line naming patient, file and problem.
ANTs and the imaging stack are imported inside the handlers to keep ``hemexp --help`` fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hemexp.core.commands import add_config_arg, config_from, patient_stage
from hemexp.core.deid import scrub_text, shareable_path


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, text in (
        ("ingest", _ingest, "load + check + skull-strip one patient's raw CT/masks -> results/ingested/{p}/"),
        ("preprocess", _preprocess, "register + resample/crop + QC one ingested patient -> results/preprocessed/{p}/"),
        ("shard", _shard, "write one preprocessed patient's slice shard -> results/shards/{p}.parquet"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("patient", help="patient ID (manifest patient_id)")
        add_config_arg(p)
        p.set_defaults(func=func)

    p = sub.add_parser("export-grid", help="write the canonical CT the pipeline works on (NIfTI, HU) for drawing "
                       "masks in ITK-SNAP / 3D Slicer -> results/annotation/{p}_{timepoint}_ct.nii.gz")
    p.add_argument("patient", help="patient ID (manifest patient_id)")
    p.add_argument("--timepoint", choices=("baseline", "followup"), default="baseline",
                   help="which CT of the manifest row (default: baseline)")
    p.add_argument("--out", default=None, help="output .nii/.nii.gz file (default: under results_dir)")
    add_config_arg(p)
    p.set_defaults(func=_export_grid)

    p = sub.add_parser("build-template", help="build the CT template from training baselines (preprocess.template: null)")
    p.add_argument("--patients", nargs="+", required=True,
                   help="candidate patient IDs: the first preprocess.template_n_patients of them (sorted) that "
                        "ingest cleanly build the template; the rule passes the first n + 1 sorted training IDs")
    add_config_arg(p)
    p.set_defaults(func=_build_template)


def _template_guard(func):
    """A missing/unusable template is a configuration problem: one line, exit 2, no traceback."""

    def run(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
        from hemexp.preprocess.template import TemplateError

        try:
            func(args, cfg)
        except TemplateError as err:
            print(f"hemexp {args.command}: {scrub_text(str(err), results_dir=cfg['results_dir'])}", file=sys.stderr)
            raise SystemExit(2) from err

    return run


@patient_stage("ingest")
def _ingest(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from hemexp.preprocess.pipeline import ingest_patient

    info = ingest_patient(cfg, args.patient)
    v = info["volumes_ml"]
    print(f"{args.patient}: ingested; IPH {v['baseline']['iph']:.2f} -> {v['followup']['iph']:.2f} mL")


@patient_stage("preprocess")
@_template_guard
def _preprocess(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from hemexp.preprocess.pipeline import preprocess_patient

    summary = preprocess_patient(cfg, args.patient)
    for warning in summary["warnings"]:
        print(f"{args.patient}: warning: {warning}", file=sys.stderr)
    print(f"{args.patient}: preprocessed; brain Dice {summary['registration']['brain_dice']:.3f}, "
          f"expansion={int(summary['expansion'])}")


@patient_stage("shard")
def _shard(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from hemexp.preprocess.pipeline import shard_patient

    print(f"{args.patient}: wrote {shareable_path(shard_patient(cfg, args.patient), results_dir=cfg['results_dir'])}")


def _export_grid(args: argparse.Namespace) -> int:
    """The exact canonical CT ``ingest`` writes (same loader: series choice, tilt/spacing correction, RAS+,
    HU clip), so a mask drawn on it is on the pipeline's grid. Not a pipeline stage: a bad input is
    reported (exit 1) but not recorded as a failed patient."""
    import numpy as np

    from hemexp.core.errors import PatientInputError
    from hemexp.core.layout import Layout, manifest_path
    from hemexp.io.ingest import load_ct
    from hemexp.io.nifti import is_nifti_path, save_nifti
    from hemexp.preprocess.pipeline import patient_row

    cfg = config_from(args)  # checks the patient ID first: nothing is read or written for a hostile one
    if args.out is not None and not is_nifti_path(args.out):
        print(f"hemexp export-grid: --out must end in .nii or .nii.gz: {args.out}", file=sys.stderr)
        return 2
    out = args.out or Layout.of(cfg).annotation_grid(args.patient, args.timepoint)
    try:
        row = patient_row(cfg, args.patient)
        ct = load_ct(row[f"{args.timepoint}_ct"], args.patient)
    except PatientInputError as err:
        print(f"hemexp export-grid: {err.shareable(manifest_path(cfg).parent, cfg['results_dir'])}", file=sys.stderr)
        return 1
    path = save_nifti(ct, out, np.float32)
    shown = path if args.out else shareable_path(path, results_dir=cfg["results_dir"])
    print(f"{args.patient}: {args.timepoint} CT grid {ct.shape} at "
          f"{'x'.join(f'{v:.3g}' for v in np.linalg.norm(ct.affine[:3, :3], axis=0))} mm -> {shown}")
    return 0


def _build_template(args: argparse.Namespace) -> int:
    from hemexp.preprocess.pipeline import ingest_patient
    from hemexp.preprocess.template import TemplateError, build_template, usable_baselines, write_template

    cfg = config_from(args)
    if cfg["preprocess"]["template"]:
        print("hemexp build-template: preprocess.template is set; nothing to build", file=sys.stderr)
        return 2
    try:
        brains, masks, info = usable_baselines(cfg, args.patients, ingest_patient)
    except TemplateError as err:
        print(f"hemexp build-template: {err}", file=sys.stderr)
        return 2
    for skip in info["skipped"]:
        print(f"hemexp build-template: skipped {skip['patient_id']} ({skip['problem']})", file=sys.stderr)
    template, mask = build_template(brains, masks, cfg["preprocess"]["registration_mm"], cfg["seed"])
    path, mask_path = write_template(template, mask, cfg, info)
    print(f"template from {len(brains)} baselines ({', '.join(info['patients'])}): {path} ({mask_path})")
    return 0
