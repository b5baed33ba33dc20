"""Conditional latent-diffusion U-Net, noise-schedule helpers and the saved-model format.

The network is MONAI's ``DiffusionModelUNet``; :class:`ConditionalLatentUNet` only concatenates the
baseline latent(s) to the noisy progression and routes clinical vector and expansion flag through
:class:`hemexp.diffusion.conditioning.ConditionEmbedding` (see that module for why this is the smallest
extension of MONAI's forward). Schedules, noising and the v target are MONAI's schedulers'; the only
hand-written algebra is the min-SNR-γ weight (Hang et al., ICCV 2023), which no installed library
provides, and the x0/ε recovery from v used by tests. The guided DDIM loop is
:mod:`hemexp.diffusion.ddim`'s.

**What the sampling stage calls**

* ``model, info, sched_cfg = load_diffusion(path, map_location)`` — ``model`` is in eval mode and
  holds the EMA weights; ``info`` = variant name, context, conditioning, latent channels, context step
  (mm), clinical names; ``sched_cfg`` feeds :func:`ddim_scheduler`.
* ``v = model(x_t, t, baseline, clinical, flag, drop_clinical)`` with ``x_t`` ``[B, C, h, w]``
  (noisy normalised Δz), ``t`` ``[B]`` long, ``baseline`` ``[B, C*context, h, w]`` (normalised
  baseline latents of the context slices in z order, centre in the middle), ``clinical`` ``[B, 7]``,
  ``flag`` ``[B]`` long, ``drop_clinical`` ``[B]`` bool (True = null clinical embedding). Classifier-free
  guidance and the DDIM loop: :func:`hemexp.diffusion.ddim.ddim_loop`.
* ``ddim_scheduler(sched_cfg, steps)`` — MONAI ``DDIMScheduler`` with the training schedule,
  v-prediction and sample clipping off (normalised Δz is not confined to [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from hemexp.core.clinical import CLINICAL_NAMES
from hemexp.core.errors import reading_product
from hemexp.core.files import atomic_path
from hemexp.diffusion.adagn import use_scale_shift
from hemexp.diffusion.conditioning import (
    ConditionEmbedding,
    ConditionTokens,
    pack_condition,
    uses_clinical,
    uses_flag,
)

# Config names -> MONAI NoiseSchedules names. MONAI >= 1.4 ships 'sigmoid_beta' (the reference
# code's 'sigmoid'), so no schedule needs registering; the short names are kept for readability.
SCHEDULE_NAMES = {
    "sigmoid": "sigmoid_beta",
    "linear": "linear_beta",
    "scaled_linear": "scaled_linear_beta",
}
MODEL_FORMAT = "hemexp-diffusion-v1"


class ConditionalLatentUNet(nn.Module):
    """MONAI ``DiffusionModelUNet`` conditioned on baseline latents, clinical vector and expansion flag.

    Args:
        latent_channels: VAE latent channels ``C`` (the U-Net predicts ``C`` channels of v).
        context: baseline slices concatenated (1 = 2D, 3 or 5 = 2.5D).
        conditioning: 'i', 'ic' or 'ice' (see :mod:`hemexp.diffusion.conditioning`).
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups: MONAI U-Net.
        clinical_hidden: hidden width of the clinical MLP.
        cross_attention: also feed the condition as cross-attention tokens (:class:`ConditionTokens`).
        delta_scale: the factor between normalised Δz and the space the model diffuses in
            (``x_0 = Δz / delta_scale``). 1 diffuses Δz as it is; a variant's ``unit_delta`` sets it to
            Δz's RMS over the training target slices, so the model's x_0 has unit variance, the scale
            the noise schedule was designed for (see :func:`delta_rms`).
        scale_shift: apply the embedding as scale and shift after each residual block's second
            GroupNorm (AdaGN, :mod:`hemexp.diffusion.adagn`) instead of MONAI's additive bias.
        flag_channel: also concatenate the flag as a constant input plane (+1 expansion, -1 none). The
            embedding reaches the features only as one bias (or scale) per channel and block; the plane
            lets the first convolution combine the flag with the baseline clot at each cell, i.e.
            "grow *here* when asked to expand", which is where the flag's effect lives.
    """

    def __init__(self, latent_channels: int, context: int, conditioning: str, channels: list[int],
                 attention_levels: list[bool], num_res_blocks: int = 2, num_head_channels: int = 32,
                 norm_num_groups: int = 32, clinical_hidden: int = 64, cross_attention: bool = False,
                 delta_scale: float = 1.0, scale_shift: bool = False, flag_channel: bool = False):
        super().__init__()
        if not delta_scale > 0:
            raise ValueError(f"delta_scale must be > 0, got {delta_scale}")
        self.latent_channels = latent_channels
        self.delta_scale = float(delta_scale)
        self.context = context
        self.conditioning = conditioning
        self.uses_clinical = uses_clinical(conditioning)
        self.uses_flag = uses_flag(conditioning)
        self.cross_attention = bool(cross_attention) and self.uses_clinical
        if flag_channel and not self.uses_flag:
            raise ValueError(f"flag_channel needs a flag-conditioned variant, not conditioning {conditioning!r}")
        self.flag_channel = bool(flag_channel)
        token_dim = int(channels[0]) * 2
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=latent_channels * (1 + context) + int(self.flag_channel),
            out_channels=latent_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            num_class_embeds=2 if self.uses_clinical else None,
            with_conditioning=self.cross_attention,
            cross_attention_dim=token_dim if self.cross_attention else None,
        )
        self.tokens = ConditionTokens(token_dim, conditioning) if self.cross_attention else None
        self.scale_shift = bool(scale_shift)
        if self.scale_shift:
            use_scale_shift(self.unet)
        if self.uses_clinical:
            # Replace MONAI's nn.Embedding with the additive clinical/flag embedding (same output width).
            dim = self.unet.class_embedding.embedding_dim
            self.unet.class_embedding = ConditionEmbedding(dim, conditioning, len(CLINICAL_NAMES), clinical_hidden)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, baseline: torch.Tensor,
                clinical: torch.Tensor | None = None, flag: torch.Tensor | None = None,
                drop_clinical: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the diffusion target (v for v-prediction) of noisy Δz ``x_t`` at steps ``t``.

        Inputs a variant does not use are ignored ('i' ignores clinical and flag; 'ic' the flag), so
        one call signature serves every variant. ``drop_clinical`` defaults to all False.
        """
        expected = self.latent_channels * self.context
        if baseline.shape[1] != expected:
            raise ValueError(f"baseline has {baseline.shape[1]} channels; this model needs {expected}")
        x = torch.cat([x_t, baseline.to(x_t.dtype)], dim=1)
        if not self.uses_clinical:
            return self.unet(x, t)
        if clinical is None:
            raise ValueError(f"variant conditioning {self.conditioning!r} needs the clinical vector")
        batch = x.shape[0]
        if flag is None:
            if self.uses_flag:
                raise ValueError(f"variant conditioning {self.conditioning!r} needs the expansion flag")
            flag = torch.zeros(batch, dtype=torch.long, device=x.device)
        if drop_clinical is None:
            drop_clinical = torch.zeros(batch, dtype=torch.bool, device=x.device)
        if self.flag_channel:  # the flag is not guided (clinical-only CFG), so the plane is never dropped
            plane = (2.0 * flag.to(x.device, x.dtype) - 1.0).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
            x = torch.cat([x, plane], dim=1)
        labels = pack_condition(clinical.to(x.device), flag.to(x.device), drop_clinical.to(x.device))
        context = self.tokens(labels).to(x.dtype) if self.tokens is not None else None
        return self.unet(x, t, context=context, class_labels=labels)


def model_config(diffusion_cfg: dict[str, Any], variant_context: int, conditioning: str,
                 latent_channels: int, cross_attention: bool = False, delta_scale: float = 1.0,
                 scale_shift: bool = False, flag_channel: bool = False) -> dict[str, Any]:
    """The constructor arguments of :class:`ConditionalLatentUNet` (saved with the weights)."""
    unet = diffusion_cfg["unet"]
    return {
        "latent_channels": int(latent_channels),
        "context": int(variant_context),
        "conditioning": conditioning,
        "channels": list(unet["channels"]),
        "attention_levels": list(unet["attention_levels"]),
        "num_res_blocks": int(unet["num_res_blocks"]),
        "num_head_channels": int(unet["num_head_channels"]),
        "norm_num_groups": int(unet["norm_num_groups"]),
        "clinical_hidden": int(unet["clinical_hidden"]),
        "cross_attention": bool(cross_attention),
        "delta_scale": float(delta_scale),
        "scale_shift": bool(scale_shift),
        "flag_channel": bool(flag_channel),
    }


def delta_rms(deltas: list[torch.Tensor] | torch.Tensor) -> float:
    """Root mean square of normalised Δz over the given training items (the ``unit_delta`` scale).

    Why: the latents are z-scored, but their *difference* is not. On the validity cohort most of a
    target slice does not change between scans, so Δz is far smaller than the unit-variance noise the
    schedule adds; the signal then drowns at all but the last steps, where the baseline already shows
    the answer and the condition is not needed. Dividing by this one scalar (Rombach et al.'s latent
    scale factor, applied to the progression) moves the schedule's SNR range onto Δz itself.
    """
    stacked = torch.stack(list(deltas)) if isinstance(deltas, list) else deltas
    rms = float(stacked.double().pow(2).mean().sqrt())
    if not rms > 0:
        raise ValueError("training Δz is identically zero: no progression to learn a scale from")
    return rms


def build_model(config: dict[str, Any]) -> ConditionalLatentUNet:
    return ConditionalLatentUNet(**config)


# ----------------------------------------------------------------------------- schedules


def scheduler_config(diffusion_cfg: dict[str, Any]) -> dict[str, Any]:
    """Scheduler settings saved with a model: T, MONAI schedule name, prediction type."""
    name = diffusion_cfg["beta_schedule"]
    return {
        "num_train_timesteps": int(diffusion_cfg["timesteps"]),
        "schedule": SCHEDULE_NAMES.get(name, name),
        "prediction_type": diffusion_cfg["prediction"],
    }


def ddpm_scheduler(sched_cfg: dict[str, Any]) -> DDPMScheduler:
    """Training-time scheduler: ``add_noise`` and ``get_velocity`` from MONAI."""
    return DDPMScheduler(num_train_timesteps=sched_cfg["num_train_timesteps"], schedule=sched_cfg["schedule"],
                         prediction_type=sched_cfg["prediction_type"], clip_sample=False)


def ddim_scheduler(sched_cfg: dict[str, Any], num_inference_steps: int) -> DDIMScheduler:
    """Sampling scheduler (paper: DDIM, 100 steps); clipping off because normalised Δz is unbounded."""
    sched = DDIMScheduler(num_train_timesteps=sched_cfg["num_train_timesteps"], schedule=sched_cfg["schedule"],
                          prediction_type=sched_cfg["prediction_type"], clip_sample=False)
    sched.set_timesteps(num_inference_steps)
    return sched


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at integer steps ``t``."""
    a = alphas_cumprod.to(t.device)[t].double()
    return (a / (1.0 - a)).float()


def min_snr_weight(snr_t: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight for one prediction target (Hang et al. 2023, eq. 5 and its v/ε forms).

    The x0-space weight ``min(SNR, γ)`` becomes ``min(SNR, γ) / SNR`` for ε and
    ``min(SNR, γ) / (SNR + 1)`` for v targets; ``gamma=None`` means unweighted (1).
    """
    if gamma is None:
        return torch.ones_like(snr_t)
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def x0_eps_from_v(v: torch.Tensor, x_t: torch.Tensor, alphas_cumprod: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover (x0, ε) from a v prediction: x0 = √ᾱ x_t − √(1−ᾱ) v, ε = √ᾱ v + √(1−ᾱ) x_t."""
    a = alphas_cumprod.to(x_t.device, x_t.dtype)[t].reshape(-1, *([1] * (x_t.ndim - 1)))
    return a.sqrt() * x_t - (1 - a).sqrt() * v, a.sqrt() * v + (1 - a).sqrt() * x_t


# ----------------------------------------------------------------------------- saved model


def save_diffusion(path: str | Path, model: ConditionalLatentUNet, config: dict[str, Any],
                   variant_info: dict[str, Any], sched_cfg: dict[str, Any]) -> None:
    """Write ``model.pt``: EMA weights, constructor config, variant info, scheduler config (atomic)."""
    payload = {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": config,
        "variant": variant_info,
        "scheduler": sched_cfg,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_diffusion(path: str | Path, map_location: str | torch.device = "cpu"
                   ) -> tuple[ConditionalLatentUNet, dict[str, Any], dict[str, Any]]:
    """Load ``model.pt`` -> (model in eval mode with EMA weights, variant info, scheduler config)."""
    with reading_product(path, "train-diffusion", what="diffusion model"):
        payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a HemExp diffusion model (format {payload.get('format')!r})")
    model = build_model(payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    model.to(map_location).eval()
    return model, payload["variant"], payload["scheduler"]
