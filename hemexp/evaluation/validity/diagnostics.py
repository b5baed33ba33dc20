"""Why a model ignores its conditioning: two measurements the validity study records per variant.

* **Conditioning sensitivity.** At a few noise levels, how far the denoiser's x0 prediction moves when
  the expansion flag is flipped, or the clinical embedding replaced by the null one, compared with how
  far it moves when the *baseline* is swapped for another patient's. A model that reads its inputs
  the way the data asks moves a lot for the flag (it decides whether the hematoma grows by a third);
  one that identifies its patient from the image and ignores the rest moves only for the baseline.
* **Denoising fit, training vs held-out patients.** Per noise level, the x0 prediction's error against
  the true Δz on the training patients' target slices and on the test patients', as a fraction of
  the error of predicting no change, with the true condition, the flag flipped and the clinical input
  nulled. A model that memorised its training patients (each baseline identifies its patient, so
  neither flag nor clinical vector is needed) explains far more of Δz on the training split than on
  the held-out one, and flipping the flag barely hurts it on either. The same share is also measured
  on the cells near the baseline hematoma alone (:func:`hemexp.diffusion.lesion.near_baseline_hematoma`),
  where growth happens, with the share of Δz's energy that lies there: outside it, Δz is mostly the
  two scans' noise, which nothing can predict.
* **VAE volume bias.** The IPH volume of the baseline's own VAE round trip minus the true baseline
  volume, on the sampled slices: what absolute decoding adds to every sampled follow-up before any
  growth is sampled (:func:`hemexp.sampling.sampler.decode_followups`).
* **The truth, measured as a sample is.** The patient's true follow-up IPH volume on the model grid,
  on the sampled slices only (the baseline elsewhere, as a sample is reassembled), and encoded and
  decoded by the VAE in each decode mode. Whether each expands by the paper's rule bounds the
  adherence a perfect model could show here: the grid, the sampled z-range and the VAE can each
  lose growth, or add it, before any diffusion model is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hemexp.core.clinical import clinical_vector, mask_volume_ml
from hemexp.diffusion.model import ddpm_scheduler, x0_eps_from_v
from hemexp.diffusion.train import LatentPairs
from hemexp.sampling.products import assemble
from hemexp.sampling.sampler import (
    DECODE_MODES,
    DecodeReference,
    EncodedBaseline,
    decode_followups_modes,
    encode,
    slice_stack,
)

NOISE_STEPS = (100, 300, 500, 700, 900)


def vae_volume_bias_ml(reference: DecodeReference, threshold: float, spacing: Sequence[float]) -> float:
    """Round-trip IPH volume minus the baseline's, on the sampled slices (mL)."""
    decoded = (reference.decoded[1] > threshold).astype(np.uint8)
    truth = reference.inputs[:, 1] > 0.5
    # [S, H, W] slice stacks: the volume of a mask does not depend on the axis order
    return mask_volume_ml(decoded, spacing) - mask_volume_ml(truth.astype(np.uint8), spacing)


TRUTH_MEASURES = ("grid", "sampled_slices", *(f"decoded_{m}" for m in DECODE_MODES))


def truth_as_sampled(sampler: Any, followup: dict[str, np.ndarray], hu_window: Sequence[float]) -> dict[str, float]:
    """IPH volume (mL) of the true follow-up under each of :data:`TRUTH_MEASURES`: the whole grid; the
    sampled slices ``sampler.zs`` on the baseline elsewhere; and those slices encoded and decoded in
    each of the sampler's decode modes (``sampler`` is the study's
    :class:`~hemexp.evaluation.guidance.run.BundleSampler`: same slices, threshold and reference)."""
    bundle, zs, base = sampler.bundle, sampler.zs, sampler.baseline["iph"]
    images = slice_stack(followup["ct"], followup["iph"], followup["ivh"], zs, hu_window)
    out = {"grid": mask_volume_ml(followup["iph"], sampler.spacing),
           "sampled_slices": mask_volume_ml(assemble(base, (images[:, 1] > 0.5).astype(np.uint8), zs), sampler.spacing)}
    z_fu = encode(bundle.vae, images, bundle.device, sampler.settings.decode_batch)
    decoded = decode_followups_modes(bundle, z_fu, 1, sampler.decode_modes, sampler.threshold,
                                     sampler.settings.decode_batch, sampler.reference)
    for mode, (_, iph, _) in decoded.items():
        out[f"decoded_{mode}"] = mask_volume_ml(assemble(base, iph, zs), sampler.spacing)
    return out


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
            return x0_eps_from_v(v.float(), x, sched.alphas_cumprod, tt)[0] * model.delta_scale  # -> Δz units

        ref = x0(cond, flags)
        out["step"].append(step)
        out["x0_rms"].append(_rms(ref))
        out["flag"].append(_rms(x0(cond, 1 - flags) - ref) if model.uses_flag else 0.0)
        out["clinical"].append(_rms(x0(cond, flags, drop=True) - ref) if model.uses_clinical else 0.0)
        out["baseline"].append(_rms(x0(other_cond, flags) - ref))
    return out


FIT_CONDITIONS = ("true", "flag_flipped", "null_clinical", "no_change")
NEAR_TERMS = ("true_near", "no_change_near")  # the same errors on the cells near the baseline hematoma


@torch.no_grad()
def denoising_fit(model: Any, sched_cfg: dict[str, Any], dataset: LatentPairs, seed: int = 0,
                  batch_size: int = 256) -> dict[str, list[float]]:
    """Mean squared error (normalised Δz units) of the x0 prediction per noise step in
    :data:`NOISE_STEPS`, for every target slice of ``dataset``, under each of :data:`FIT_CONDITIONS`
    (``no_change`` predicts Δz = 0: the scale the others are read against), and ``true_near`` /
    ``no_change_near``: the true-condition and no-change squared errors summed over the cells near
    the baseline hematoma only (divided by every element's count, as the others). Noise is seeded."""
    sched = ddpm_scheduler(sched_cfg)
    device = next(model.parameters()).device
    items = [dataset[i] for i in range(len(dataset))]
    data = {k: torch.stack([it[k] for it in items]) for k in ("delta", "baseline", "clinical", "flag")}
    data["near"] = torch.stack([dataset.near(i) for i in range(len(items))])[:, None].float()
    noise = torch.randn(data["delta"].shape, generator=torch.Generator().manual_seed(seed))
    out: dict[str, list[float]] = {k: [] for k in (*FIT_CONDITIONS, *NEAR_TERMS)}
    for step in NOISE_STEPS:
        sums = dict.fromkeys(out, 0.0)
        for start in range(0, len(items), batch_size):
            part = {k: v[start:start + batch_size].to(device) for k, v in data.items()}
            delta, n = part["delta"], part["delta"].shape[0]
            t = torch.full((n,), step, dtype=torch.long, device=device)
            x_t = sched.add_noise(delta / model.delta_scale, noise[start:start + batch_size].to(device), t)

            def error(flag: torch.Tensor, drop: bool, x: torch.Tensor = x_t, tt: torch.Tensor = t,
                      p: dict[str, torch.Tensor] = part) -> torch.Tensor:
                v = model(x, tt, p["baseline"], p["clinical"], flag, torch.full((len(x),), drop, device=device))
                x0 = x0_eps_from_v(v.float(), x, sched.alphas_cumprod, tt)[0] * model.delta_scale
                return (x0 - p["delta"]).pow(2)

            true = error(part["flag"], False)
            true_sum = float(true.sum())  # an input the variant ignores changes nothing: reuse it
            sums["true"] += true_sum
            sums["flag_flipped"] += float(error(1 - part["flag"], False).sum()) if model.uses_flag else true_sum
            sums["null_clinical"] += float(error(part["flag"], True).sum()) if model.uses_clinical else true_sum
            sums["no_change"] += float(delta.pow(2).sum())
            sums["true_near"] += float((true * part["near"]).sum())
            sums["no_change_near"] += float((delta.pow(2) * part["near"]).sum())
        for k in out:
            out[k].append(sums[k] / data["delta"].numel())
    return out


def fit_summary(fit: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per noise step: the share of Δz's no-change error the prediction explains (1 − MSE / MSE₀), and
    how much worse it gets with the flag flipped or the clinical input nulled (MSE ratio − 1); the
    explained share on the cells near the baseline hematoma, and the share of Δz's energy there."""
    mse0 = np.maximum(np.asarray(fit["no_change"]), 1e-12)
    true = np.maximum(np.asarray(fit["true"]), 1e-12)
    near0 = np.maximum(np.asarray(fit["no_change_near"]), 1e-12)
    return {"explained": (1.0 - true / mse0).tolist(),
            "explained_near": (1.0 - np.asarray(fit["true_near"]) / near0).tolist(),
            "near_energy_share": (np.asarray(fit["no_change_near"]) / mse0).tolist(),
            "flag_flip_penalty": (np.asarray(fit["flag_flipped"]) / true - 1.0).tolist(),
            "null_clinical_penalty": (np.asarray(fit["null_clinical"]) / true - 1.0).tolist()}


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
