"""Latent cache and diffusion commands: encode (per patient), latent-stats, train-diffusion (per variant).

``freeze_models: true`` makes latent-stats and train-diffusion keep an existing product instead of
recomputing it (the workflow does not even schedule them then; this guards manual calls too).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hemexp.core.commands import add_config_arg, config_from, patient_stage
from hemexp.core.layout import Layout


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="encode every shard slice of one patient with the frozen VAE "
                                      "-> results/latents/{p}.npz")
    p.add_argument("patient", help="patient ID (manifest patient_id)")
    add_config_arg(p)
    p.set_defaults(func=_encode)

    p = sub.add_parser("latent-stats", help="channel-wise latent mean/std over the training split "
                                            "-> results/latents/stats.json")
    p.add_argument("--patients", nargs="+", default=None,
                   help="patients whose latents to use (default: the cohort's training patients)")
    add_config_arg(p)
    p.set_defaults(func=_latent_stats)

    p = sub.add_parser("train-diffusion", help="train one diffusion variant -> results/models/diffusion/{v}/")
    p.add_argument("variant", help="a name from diffusion.variants")
    p.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="require resuming from last.ckpt (default: resume when it matches the setup)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start afresh")
    add_config_arg(p)
    p.set_defaults(func=_train_diffusion)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@patient_stage("encode")
def _encode(args: argparse.Namespace, cfg: dict[str, Any]) -> None:

    from hemexp.core.errors import PatientInputError
    from hemexp.diffusion.latents import encode_patient, save_latents
    from hemexp.vae.model import load_vae

    shard = Layout.of(cfg).shard(args.patient)
    if not shard.exists():
        raise PatientInputError(args.patient, shard, "shard not found (run `hemexp shard` first)")
    device = _device()
    vae = load_vae(Layout.of(cfg).vae_model, map_location=device)
    arrays = encode_patient(shard, vae, tuple(cfg["preprocess"]["hu_window"]), int(cfg["latents"]["batch_size"]),
                            device)
    out = Layout.of(cfg).latents(args.patient)
    save_latents(out, arrays)
    print(f"{args.patient}: encoded {len(arrays['z'])} slices ({int(arrays['is_target'].sum())} targets), "
          f"latent {tuple(arrays['z_bl'].shape[1:])} -> {out}")


def _latent_stats(args: argparse.Namespace) -> int:
    from hemexp.cohort.patients import patients
    from hemexp.diffusion.latents import compute_stats, load_latents, write_stats

    cfg = config_from(args)
    out = Layout.of(cfg).latent_stats
    if cfg["freeze_models"] and out.exists():
        print(f"freeze_models: keeping {out}")
        return 0
    ids = args.patients or sorted(p.patient_id for p in patients(cfg) if p.split == "train")
    missing = [pid for pid in ids if not Layout.of(cfg).latents(pid).exists()]
    if missing:
        print(f"hemexp latent-stats: latents missing for {missing}", file=sys.stderr)
        return 1
    stats = compute_stats(load_latents(Layout.of(cfg).latents(pid)) for pid in ids)
    write_stats(out, stats)
    if stats["skipped"]:
        print(f"skipped non-training patients: {stats['skipped']}", file=sys.stderr)
    print(f"latent stats from {len(stats['patients'])} training patients: mean "
          f"{[round(m, 3) for m in stats['mean']]}, std {[round(s, 3) for s in stats['std']]} -> {out}")
    return 0


def _train_diffusion(args: argparse.Namespace) -> int:
    from hemexp.core.config import unknown_variant
    from hemexp.diffusion.train import train_diffusion

    cfg = config_from(args)
    if problem := unknown_variant(cfg, args.variant, "train-diffusion"):
        print(problem, file=sys.stderr)
        return 2
    model = Layout.of(cfg).diffusion_model(args.variant)
    if cfg["freeze_models"] and model.exists():
        print(f"freeze_models: keeping {model}")
        return 0
    print(f"wrote {train_diffusion(cfg, args.variant, resume=args.resume)}")
    return 0
