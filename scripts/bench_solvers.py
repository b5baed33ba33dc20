#!/usr/bin/env python
"""Benchmark (not a test): is a fast solver's sample distribution the one 100-step DDIM gives?

On a trained model and its preprocessed test patients, each patient is sampled (same flags, N samples)
by the reference, DDIM at ``--ref-steps`` (the paper's 100) with seed 0; by DDIM at the same steps
with seed 1 (the Monte-Carlo floor: two independent draws of the same distribution); and by every
solver at each of ``--steps`` with seed 1. Per patient and run the measures are the Wasserstein-1
distance (mL) of the sampled follow-up total (IPH + IVH) and IPH volume distributions to the
reference's, and the mean absolute difference of the IPH probability map (voxels of the sampled
slab). The table gives, per solver and steps, the median over patients, its ratio to the floor, the
U-Net calls and seconds; a solver/steps is equal to DDIM-100 when it sits at the floor.

    .venv/bin/python scripts/bench_solvers.py --config results/config/resolved.yaml --variant 2D-ice \
        --patients D001 D003 D005 --n-samples 10 --out results/benchmarks/solvers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.stats import wasserstein_distance

from hemexp.core.clinical import clinical_vector, mask_volume_ml
from hemexp.core.config import load_config
from hemexp.core.layout import Layout
from hemexp.io.nifti import affine_spacing_mm
from hemexp.preprocess.pipeline import read_summary
from hemexp.sampling.products import probability_maps, sample_volumes
from hemexp.sampling.sampler import SamplerSettings, generate_followups, load_bundle
from hemexp.sampling.simulate import PatientInput, load_baseline


def draw(bundle, baseline, spacing, clinical, flags, cfg, solver: str, steps: int, seed: int) -> dict:
    """One sample set: total and IPH volumes [N] (mL), the IPH probability map, U-Net calls, seconds."""
    settings = SamplerSettings.from_config(cfg["sampling"], solver=solver, steps=steps, seed=seed, eta=0.0)
    t0 = time.perf_counter()
    fs = generate_followups(bundle, baseline, spacing[2], clinical, flags, settings, cfg["sampling"]["z_margin_mm"],
                            cfg["sampling"]["mask_threshold"], cfg["preprocess"]["hu_window"])
    seconds = time.perf_counter() - t0
    vols = sample_volumes(fs.zs, {"ct": fs.ct_hu, "iph": fs.iph, "ivh": fs.ivh}, baseline)
    iph = np.array([mask_volume_ml(v, spacing) for v in vols["iph"]])
    ivh = np.array([mask_volume_ml(v, spacing) for v in vols["ivh"]])
    maps = probability_maps(vols, baseline, flags, {1: 1.0, 0: 0.0} if all(flags) else {1: 0.5, 0: 0.5})
    slab = maps["iph_prob"][:, :, fs.zs]
    return {"total": iph + ivh, "iph": iph, "map": slab, "calls": fs.info["unet_calls"], "seconds": seconds}


def distances(run: dict, ref: dict) -> dict[str, float]:
    return {"w1_total_ml": float(wasserstein_distance(run["total"], ref["total"])),
            "w1_iph_ml": float(wasserstein_distance(run["iph"], ref["iph"])),
            "map_l1": float(np.abs(run["map"] - ref["map"]).mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--variant", default=None)
    p.add_argument("--patients", nargs="+", required=True)
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--ref-steps", type=int, default=100)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25])
    p.add_argument("--solvers", nargs="+", default=["ddim", "dpmpp_2m", "unipc"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = load_config(args.config)
    layout = Layout.of(cfg)
    variant = args.variant or cfg["evaluation"]["perturbation_variant"]
    bundle = load_bundle(layout.vae_model, layout.diffusion_model(variant), layout.latent_stats)
    rows: dict[str, list[dict]] = {}
    for pid in args.patients:
        pre = read_summary(pid, layout.preprocessed(pid))
        baseline, affine = load_baseline(PatientInput(pid, layout.preprocessed(pid), pre["clinical"]))
        spacing = affine_spacing_mm(affine)
        flags = [1] * (args.n_samples // 2) + [0] * (args.n_samples - args.n_samples // 2)
        clinical = clinical_vector(pre["clinical"])
        ref = draw(bundle, baseline, spacing, clinical, flags, cfg, "ddim", args.ref_steps, seed=0)
        runs = {f"floor ddim@{args.ref_steps}": ("ddim", args.ref_steps)}
        runs.update({f"{s}@{k}": (s, k) for s in args.solvers for k in args.steps})
        for name, (solver, steps) in runs.items():
            run = draw(bundle, baseline, spacing, clinical, flags, cfg, solver, steps, seed=1)
            rows.setdefault(name, []).append({"patient": pid, **distances(run, ref), "calls": run["calls"],
                                              "seconds": run["seconds"]})
            print(pid, name, rows[name][-1], flush=True)
    floor = {k: statistics.median(r[k] for r in rows[f"floor ddim@{args.ref_steps}"])
             for k in ("w1_total_ml", "w1_iph_ml", "map_l1")}
    table = []
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("w1_total_ml", "w1_iph_ml", "map_l1", "calls", "seconds")}
        table.append({"run": name, **med, **{f"{k}_vs_floor": med[k] / floor[k] if floor[k] else float("nan")
                                            for k in floor}})
    out = {"variant": variant, "patients": args.patients, "n_samples": args.n_samples, "floor": floor,
           "table": table, "per_patient": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| run | W1 total (mL) | x floor | W1 IPH (mL) | x floor | map L1 | x floor | U-Net calls | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['run']} | {r['w1_total_ml']:.3f} | {r['w1_total_ml_vs_floor']:.2f} | {r['w1_iph_ml']:.3f} | "
              f"{r['w1_iph_ml_vs_floor']:.2f} | {r['map_l1']:.4f} | {r['map_l1_vs_floor']:.2f} | {r['calls']:.0f} | "
              f"{r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
