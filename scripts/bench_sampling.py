#!/usr/bin/env python
"""Benchmark (not a test): batched DDIM sampler vs a one-slice-at-a-time, one-sample-at-a-time loop.

Both paths run the same model, the same noise and the same DDIM schedule on the same machine in one
process; the loop is :func:`hemexp.sampling.sampler.sample_deltas` with one item per U-Net call, the batched
path the same function with the chunk size derived from free memory. Throughput is
slice·samples per second (items of the N × S grid through the whole DDIM chain); each path is timed
``--repeats`` times after one warm-up run and the median is reported.

On CUDA the batched path uses bf16 autocast and channels_last (``precision: auto``), and
``--compile`` wraps the MONAI U-Net in ``torch.compile``. The default model is the config's
``diffusion.unet`` at the config's latent size with random weights (speed does not depend on the
weights); ``--model`` benchmarks a trained ``model.pt`` instead.

    .venv/bin/python scripts/bench_sampling.py --config config/config.yaml --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hemexp.core.config import load_config, variants
from hemexp.diffusion.ddim import branches
from hemexp.diffusion.model import build_model, model_config, scheduler_config
from hemexp.sampling.sampler import SamplerSettings, sample_deltas


def demo_model(cfg: dict, variant: str) -> tuple[torch.nn.Module, dict, tuple[int, int, int]]:
    """(random-weight U-Net of the config, scheduler config, latent shape C, h, w)."""
    spec = variants(cfg)[variant]
    c = int(cfg["vae"]["latent_channels"])
    factor = 2 ** (len(cfg["vae"]["channels"]) - 1)
    h, w = (int(v) // factor for v in cfg["preprocess"]["crop"])
    torch.manual_seed(0)
    model = build_model(model_config(cfg["diffusion"], spec.context, spec.conditioning, c)).eval()
    return model, scheduler_config(cfg["diffusion"]), (c, h, w)


def time_once(model: torch.nn.Module, sched: dict, base: torch.Tensor, clinical: torch.Tensor, flags: list[int],
              settings: SamplerSettings) -> tuple[float, dict]:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    _, info = sample_deltas(model, sched, base, clinical, flags, settings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, info


def bench(model: torch.nn.Module, sched: dict, shape: tuple[int, int, int], n_samples: int, n_slices: int,
          settings: SamplerSettings, repeats: int, reference_steps: int | None = None) -> dict:
    device = next(model.parameters()).device
    c, h, w = shape
    base = torch.randn(n_slices, c * model.context, h, w)
    clinical = torch.rand(7)
    flags = [k % 2 for k in range(n_samples)]
    items = n_samples * n_slices
    rows_per_item = len(branches(model, settings.guidance_scale))
    out = {}
    for name, chunk in (("loop", rows_per_item), ("batched", settings.chunk_size)):
        s = SamplerSettings(**{**settings.__dict__, "chunk_size": chunk})
        time_once(model, sched, base, clinical, flags, s)  # warm-up (allocator, kernels, compile)
        runs = [time_once(model, sched, base, clinical, flags, s) for _ in range(repeats)]
        secs = statistics.median(r[0] for r in runs)
        out[name] = {"seconds_median": secs, "seconds_all": [r[0] for r in runs], "items_per_s": items / secs,
                     "chunk_rows": runs[0][1]["chunk_rows"], "unet_calls": runs[0][1]["unet_calls"],
                     "solver": s.solver, "steps": s.steps}
    if reference_steps:
        ref = SamplerSettings(**{**settings.__dict__, "chunk_size": 2 * rows_per_item, "steps": reference_steps,
                                 "solver": "ddim", "precision": "32"})
        runs = [time_reference(model, sched, base, clinical, flags, ref) for _ in range(repeats)]
        secs = statistics.median(runs)
        out["reference"] = {"seconds_median": secs, "seconds_all": runs, "items_per_s": items / secs,
                            "chunk_rows": 2 * rows_per_item, "solver": "ddim", "steps": reference_steps,
                            "pattern": "2 slices per U-Net call, samples one after another, fp32"}
        out["speedup_vs_reference"] = out["batched"]["items_per_s"] / out["reference"]["items_per_s"]
    out["speedup"] = out["batched"]["items_per_s"] / out["loop"]["items_per_s"]
    out["device"] = str(device)
    return out


def time_reference(model: torch.nn.Module, sched: dict, base: torch.Tensor, clinical: torch.Tensor, flags: list[int],
                   settings: SamplerSettings) -> float:
    """The paper's reference code pattern: one sample after another, 2 slices per U-Net call."""
    return sum(time_once(model, sched, base, clinical, [f], settings)[0] for f in flags)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--variant", default=None, help="default: the first diffusion variant")
    ap.add_argument("--model", default=None, help="a trained model.pt instead of the random demo model")
    ap.add_argument("--samples", type=int, default=None, help="N (default: sampling.n_samples)")
    ap.add_argument("--slices", type=int, default=10, help="S sampled slices per patient")
    ap.add_argument("--steps", type=int, default=None, help="solver steps (default: sampling.ddim_steps)")
    ap.add_argument("--solver", default=None, help="batched path's solver (default: sampling.solver)")
    ap.add_argument("--reference-steps", type=int, default=0,
                    help="also time the reference code's pattern (DDIM at this many steps, 2 slices per call, "
                         "samples in turn, fp32); the paper uses 100")
    ap.add_argument("--guidance", type=float, default=None, help="default: sampling.guidance_scale")
    ap.add_argument("--chunk-size", type=int, default=None, help="batched path rows per call (default: derived)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the U-Net (CUDA)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variant = args.variant or next(iter(cfg["diffusion"]["variants"]))
    if args.model:
        from hemexp.diffusion.model import load_diffusion

        model, _, sched = load_diffusion(args.model, map_location="cpu")
        _, _, shape = demo_model(cfg, variant)
        shape = (model.latent_channels, *shape[1:])
    else:
        model, sched, shape = demo_model(cfg, variant)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        if args.compile:
            model.unet = torch.compile(model.unet)
    s = cfg["sampling"]
    settings = SamplerSettings(steps=args.steps or s["ddim_steps"], solver=args.solver or s.get("solver", "ddim"),
                               guidance_scale=s["guidance_scale"]
                               if args.guidance is None else args.guidance, seed=0, chunk_size=args.chunk_size,
                               precision=s.get("precision", "auto"), memory_fraction=s.get("memory_fraction", 0.5))
    result = bench(model, sched, shape, args.samples or s["n_samples"], args.slices, settings, args.repeats,
                   args.reference_steps or None)
    result.update(variant=variant, latent_shape=list(shape), n_samples=args.samples or s["n_samples"],
                  n_slices=args.slices, steps=settings.steps, guidance_scale=settings.guidance_scale,
                  threads=args.threads, compile=args.compile, torch=torch.__version__, machine=platform.processor()
                  or platform.machine(), cuda=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    for name in ("reference", "loop", "batched"):
        if name in result:
            r = result[name]
            print(f"{name:9s}: {r['items_per_s']:8.2f} slice·samples/s  (median {r['seconds_median']:.2f} s, "
                  f"{r['solver']} {r['steps']} steps, {r['chunk_rows']} rows per call)")
    print(f"speed-up batched / loop: {result['speedup']:.1f}x on {result['device']}")
    if "speedup_vs_reference" in result:
        print(f"speed-up batched / reference pattern: {result['speedup_vs_reference']:.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
