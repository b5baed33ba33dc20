"""Why a model ignores its conditioning: two measurements the validity study records per variant.

* **Conditioning sensitivity.** At a few noise levels, how far the denoiser's x0 prediction moves when
  the expansion flag is flipped, or the clinical embedding replaced by the null one, compared with how
  far it moves when the *baseline* is swapped for another patient's. A model that reads its inputs
  the way the data asks moves a lot for the flag (it decides whether the hematoma grows by a third);
  one that identifies its patient from the image and ignores the rest moves only for the baseline.
* **VAE volume bias.** The IPH volume of the baseline's own VAE round trip minus the true baseline
  volume, on the sampled slices: what absolute decoding adds to every sampled follow-up before any
  growth is sampled (:func:`hemexp.sampling.sampler.decode_followups`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hemexp.core.clinical import clinical_vector, mask_volume_ml
from hemexp.diffusion.model import ddpm_scheduler, x0_eps_from_v
from hemexp.sampling.sampler import DecodeReference, EncodedBaseline

NOISE_STEPS = (100, 300, 500, 700, 900)


def vae_volume_bias_ml(reference: DecodeReference, threshold: float, spacing: Sequence[float]) -> float:
    """Round-trip IPH volume minus the baseline's, on the sampled slices (mL)."""
    decoded = (reference.decoded[1] > threshold).astype(np.uint8)
    truth = reference.inputs[:, 1] > 0.5
    # [S, H, W] slice stacks: the volume of a mask does not depend on the axis order
    return mask_volume_ml(decoded, spacing) - mask_volume_ml(truth.astype(np.uint8), spacing)


def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


@torch.no_grad()
def conditioning_sensitivity(bundle: Any, enc: EncodedBaseline, other: EncodedBaseline, clinical: dict[str, float],
                             flag: int, seed: int = 0) -> dict[str, list[float]]:
    """RMS change of the x0 prediction (normalised Δz units) per noise step for flag flip, null clinical
    and another patient's baseline; the x0 prediction's own RMS for scale."""
    model = bundle.diffusion
    s = min(len(enc.zs), len(other.zs))
    cond, other_cond = enc.cond[:s].to(bundle.device), other.cond[:s].to(bundle.device)
    sched = ddpm_scheduler(bundle.sched_cfg)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((s, *enc.centre.shape[1:]), generator=gen).to(bundle.device)
    clin = torch.as_tensor(np.asarray(clinical_vector(clinical), np.float32)).expand(s, -1).to(bundle.device)
    flags = torch.full((s,), int(flag), dtype=torch.long, device=bundle.device)
    out: dict[str, list[float]] = {"step": [], "x0_rms": [], "flag": [], "clinical": [], "baseline": []}
    for step in NOISE_STEPS:
        t = torch.full((s,), step, dtype=torch.long, device=bundle.device)
        x_t = sched.add_noise(torch.zeros_like(noise), noise, t)  # no change: where every chain ends if unconditioned

        def x0(c: torch.Tensor, f: torch.Tensor, drop: bool = False, x: torch.Tensor = x_t, tt: torch.Tensor = t) -> torch.Tensor:
            v = model(x, tt, c, clin, f, torch.full((s,), drop, dtype=torch.bool, device=bundle.device))
            return x0_eps_from_v(v.float(), x, sched.alphas_cumprod, tt)[0]

        ref = x0(cond, flags)
        out["step"].append(step)
        out["x0_rms"].append(_rms(ref))
        out["flag"].append(_rms(x0(cond, 1 - flags) - ref) if model.uses_flag else 0.0)
        out["clinical"].append(_rms(x0(cond, flags, drop=True) - ref) if model.uses_clinical else 0.0)
        out["baseline"].append(_rms(x0(other_cond, flags) - ref))
    return out


def summarise(per_patient: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over patients: sensitivity per noise step, its ratios to the baseline swap, the VAE bias."""
    steps = list(NOISE_STEPS)
    mean = {k: np.mean([p["sensitivity"][k] for p in per_patient], axis=0).tolist()
            for k in ("x0_rms", "flag", "clinical", "baseline")}
    base = np.maximum(np.asarray(mean["baseline"]), 1e-12)
    bias = [p["vae_bias_ml"] for p in per_patient]
    return {"noise_steps": steps, **{f"{k}_rms" if k != "x0_rms" else k: v for k, v in mean.items()},
            "flag_over_baseline": (np.asarray(mean["flag"]) / base).tolist(),
            "clinical_over_baseline": (np.asarray(mean["clinical"]) / base).tolist(),
            "vae_iph_bias_ml_mean": float(np.mean(bias)), "vae_iph_bias_ml_mae": float(np.mean(np.abs(bias))),
            "n_patients": len(per_patient)}
