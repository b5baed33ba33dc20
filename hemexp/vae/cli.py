"""VAE commands: ``train-vae`` (train/resume, writes results/models/vae/vae.pt) and ``eval-vae``
(fidelity table + reconstruction figure). torch/Lightning are imported inside the handlers."""

from __future__ import annotations

import argparse

from hemexp.core.commands import add_config_arg, config_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-vae", help="train the multi-head VAE on the train split -> results/models/vae/vae.pt")
    add_config_arg(p)
    p.add_argument("--resume", action="store_true",
                   help="require resuming from results/models/vae/last.ckpt (default: resume automatically "
                        "when it exists and matches the config, else start afresh)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval-vae", help="VAE fidelity (CT SSIM, IPH/IVH Dice; train/test) -> results/metrics/vae_fidelity.*")
    add_config_arg(p)
    p.add_argument("--model", default=None, help="VAE file (default: results/models/vae/vae.pt)")
    p.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from hemexp.vae.train import train_vae

    out = train_vae(config_from(args), resume=True if args.resume else None)
    print(f"VAE written to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hemexp.vae.fidelity import evaluate_vae

    results = evaluate_vae(config_from(args), args.model)
    for split, r in results.items():
        print(f"{split}: CT SSIM {r['CT SSIM']:.3f}  IPH Dice {r['IPH Dice']:.3f}  IVH Dice {r['IVH Dice']:.3f}"
              f"  ({r['n_slices']} slices)")
    return 0
