"""Batched DDIM sampling of follow-up latents with classifier-free guidance on the clinical branch.

A patient's follow-up is N samples × S axial slices (the baseline IPH z-extent ± ``sampling.z_margin_mm``).
Every (sample, slice) *item* runs the whole DDIM chain; items go through the U-Net in chunks of up to
``chunk_size`` batch rows (``sampling.chunk_size``, or derived from free memory — see
:func:`auto_chunk_size`), so a patient needs ``ceil(rows / chunk) × steps`` U-Net calls instead of
``N × S × steps``.

The DDIM chain itself, with classifier-free guidance on the clinical branch, is
:func:`hemexp.diffusion.ddim.ddim_loop` — the loop the training sample grid runs too; this module adds
the sampling policy around it: per-item seeded noise, chunk sizes and the encode/decode glue.

Reproducibility: the noise of every item is keyed by (seed, sample index, slice index z), and how the
slices of one sample share it (``sampling.slice_noise``: one field per sample by default, so one sample is
one coherent 3D follow-up) is :mod:`hemexp.sampling.noise`. Initial noise is drawn before chunking and,
for η > 0, each step's noise is keyed too, so a sample gets the same noise whatever the chunk size (and
whatever other samples are drawn alongside it). A rerun with the same chunk size is bit-identical;
across chunk sizes the results agree up to the float rounding of batch-size-dependent U-Net kernels
(~1e-6 per call on CPU; oneDNN/cuDNN choose blockings by batch size). MONAI's ``DDIMScheduler.step`` draws
η-noise for the whole batch from one generator, which would tie the noise to the chunking; for η > 0
:func:`hemexp.diffusion.ddim.ddim_step` therefore takes MONAI's x0 prediction and adds the per-item noise
itself (DDIM eq. 12 with σ from MONAI's ``_get_variance``). η = 0 uses MONAI's step unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hemexp.core.files import read_json
from hemexp.core.runtime import get_logger
from hemexp.diffusion.conditioning import N_CLINICAL
from hemexp.diffusion.ddim import Progress, autocast, ddim_loop
from hemexp.diffusion.latents import check_stats, denormalise, normalise
from hemexp.diffusion.model import ConditionalLatentUNet, load_diffusion
from hemexp.diffusion.solvers import make_scheduler
from hemexp.io.shards import slice_image
from hemexp.sampling.noise import SliceNoise
from hemexp.vae.data import unwindow_ct, vae_channels
from hemexp.vae.model import load_vae

log = get_logger(__name__)
DECODE_MODES = ("absolute", "residual")
MAX_CHUNK_ROWS = 4096  # beyond this a bigger batch buys nothing on any current accelerator


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: solver and its steps, η (DDIM only), guidance scale and rule, seed, chunking and numeric precision.

    ``chunk_size``: U-Net batch rows per call (a guided item costs two rows); None = derived from free
    memory. ``precision``: 'auto' (bf16 autocast on CUDA, float32 on CPU), '32' or 'bf16'.
    """

    steps: int = 100
    eta: float = 0.0
    solver: str = "ddim"
    guidance_scale: float = 1.0
    guidance_rule: str = "cfg"
    keep_parallel: float = 0.0
    seed: int = 0
    chunk_size: int | None = None
    precision: str = "auto"
    memory_fraction: float = 0.5
    decode_batch: int = 64
    slice_noise: str = "shared"
    noise_correlation_mm: float = 30.0
    decode: str = "absolute"

    @classmethod
    def from_config(cls, sampling_cfg: dict[str, Any], **overrides: Any) -> SamplerSettings:
        """Settings from the ``sampling`` config section; ``overrides`` that are not None win."""
        values = {"steps": sampling_cfg["ddim_steps"], "eta": sampling_cfg["eta"],
                  "solver": sampling_cfg.get("solver", "ddim"),
                  "guidance_scale": sampling_cfg["guidance_scale"], "seed": sampling_cfg["seed"],
                  "guidance_rule": sampling_cfg.get("guidance_rule", "cfg"),
                  "keep_parallel": sampling_cfg.get("keep_parallel", 0.0),
                  "chunk_size": sampling_cfg["chunk_size"], "precision": sampling_cfg.get("precision", "auto"),
                  "memory_fraction": sampling_cfg.get("memory_fraction", 0.5),
                  "slice_noise": sampling_cfg.get("slice_noise", "shared"),
                  "noise_correlation_mm": sampling_cfg.get("noise_correlation_mm", 30.0),
                  "decode": sampling_cfg.get("decode", "absolute")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# ----------------------------------------------------------------------------- noise


# ----------------------------------------------------------------------------- chunk size


def _forward_rows(model: ConditionalLatentUNet, rows: int, latent_shape: tuple[int, int, int],
                  device: torch.device, precision: str) -> None:
    c, h, w = latent_shape
    x = torch.zeros(rows, c, h, w, device=device)
    base = torch.zeros(rows, c * model.context, h, w, device=device)
    t = torch.zeros(rows, dtype=torch.long, device=device)
    clin = torch.zeros(rows, N_CLINICAL, device=device)
    flag = torch.zeros(rows, dtype=torch.long, device=device)
    with torch.inference_mode(), autocast(device, precision):
        model(x, t, base, clin, flag)


def row_bytes(model: ConditionalLatentUNet, latent_shape: tuple[int, int, int], device: torch.device,
              precision: str = "auto") -> int:
    """Measured memory of one U-Net batch row.

    CUDA: the slope of peak allocated memory between probe batches of 1 and 8 rows (fixed workspace
    cancels out; the 8-row peak per row when allocator rounding hides the slope). CPU: the bytes of every module output of a one-row forward pass (forward hooks) — an
    upper bound on the peak, because inference frees intermediate activations as it goes.
    """
    if device.type == "cuda":
        peaks = []
        for rows in (1, 8):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            _forward_rows(model, rows, latent_shape, device, precision)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - start)
        slope = (peaks[1] - peaks[0]) / 7
        return max(1, int(math.ceil(slope if slope > 0 else peaks[1] / 8)))
    total = [0]

    def hook(_module: torch.nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        _forward_rows(model, 1, latent_shape, device, precision)
    finally:
        for h in handles:
            h.remove()
    return max(1, total[0])


def free_bytes(device: torch.device) -> int:
    """Free memory where the U-Net runs: ``torch.cuda.mem_get_info`` on GPU, psutil on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def auto_chunk_size(model: ConditionalLatentUNet, latent_shape: tuple[int, int, int], device: torch.device,
                    memory_fraction: float = 0.5, max_rows: int = MAX_CHUNK_ROWS, precision: str = "auto") -> int:
    """U-Net rows per call that fit ``memory_fraction`` of the free memory, in [1, ``max_rows``]."""
    per_row = row_bytes(model, latent_shape, device, precision)
    rows = int(free_bytes(device) * memory_fraction // per_row)
    chunk = max(1, min(rows, int(max_rows)))
    log.info("chunk size %d rows (%.1f MB per row measured on %s)", chunk, per_row / 1e6, device)
    return chunk


# ----------------------------------------------------------------------------- DDIM


@torch.no_grad()
def sample_deltas(model: ConditionalLatentUNet, sched_cfg: dict[str, Any], baseline: torch.Tensor,
                  clinical: torch.Tensor, flags: Sequence[int], settings: SamplerSettings,
                  slice_ids: Sequence[int] | None = None, sample_ids: Sequence[int] | None = None,
                  progress: Progress | None = None,
                  slice_spacing_mm: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Normalised Δz of N samples × S slices, ``[N, S, C, h, w]`` float32 on CPU, and run info.

    ``baseline`` ``[S, C*context, h, w]``: normalised baseline latents of each slice's context;
    ``clinical`` ``[7]`` (all samples) or ``[N, 7]`` (one row per sample, e.g. perturbation scenarios
    batched as samples); ``flags`` ``[N]``; ``slice_ids`` (default 0..S-1) and ``sample_ids`` (default
    0..N-1) key the per-item noise; ``settings.slice_noise`` says how a sample's slices share it
    (:mod:`hemexp.sampling.noise`; ``correlated`` needs ``slice_spacing_mm``).
    """
    device = next(model.parameters()).device
    n, s = len(flags), baseline.shape[0]
    slice_ids = list(range(s)) if slice_ids is None else list(slice_ids)
    sample_ids = list(range(n)) if sample_ids is None else list(sample_ids)
    clinical = clinical.float().reshape(-1, clinical.shape[-1])
    if clinical.shape[0] == 1:
        clinical = clinical.expand(n, -1)
    if clinical.shape[0] != n or len(slice_ids) != s or len(sample_ids) != n:
        raise ValueError("clinical rows, slice_ids and sample_ids must match flags and baseline slices")
    shape = (model.latent_channels, *baseline.shape[-2:])
    chunk_rows = settings.chunk_size or auto_chunk_size(model, shape, device, settings.memory_fraction,
                                                        precision=settings.precision)
    field_ = SliceNoise(settings.slice_noise, settings.seed, sample_ids, slice_ids, shape,
                        slice_spacing_mm, settings.noise_correlation_mm)
    noise = field_.initial()  # [N*S, C, h, w], sample-major: drawn before chunking
    out, info = ddim_loop(model, make_scheduler(sched_cfg, settings.solver, settings.steps, settings.eta), noise,
                          baseline, clinical,
                          torch.as_tensor(np.asarray(flags, dtype=np.int64)), settings.guidance_scale, settings.eta,
                          base_index=np.tile(np.arange(s), n), cond_index=np.repeat(np.arange(n), s),
                          step_noise=field_.step, chunk_rows=chunk_rows, precision=settings.precision,
                          channels_last=device.type == "cuda", progress=progress,
                          guidance_rule=settings.guidance_rule, keep_parallel=settings.keep_parallel)
    return out.reshape(n, s, *shape), info


# ----------------------------------------------------------------------------- models


@dataclass
class ModelBundle:
    """Everything sampling needs: frozen VAE, diffusion U-Net (EMA), variant info, schedule, latent stats."""

    vae: Any
    diffusion: ConditionalLatentUNet
    info: dict[str, Any]
    sched_cfg: dict[str, Any]
    stats: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def step_slices(self) -> int:
        return int(self.info.get("step_slices", 1))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_bundle(vae_path: str | Path, diffusion_path: str | Path, stats_path: str | Path,
                device: str | torch.device | None = None) -> ModelBundle:
    """Load the frozen VAE, one diffusion variant and the latent statistics onto ``device``."""

    device = torch.device(device) if device is not None else default_device()
    vae = load_vae(vae_path, map_location=device)
    model, info, sched_cfg = load_diffusion(diffusion_path, map_location=device)
    stats = read_json(stats_path)
    check_stats(stats, model.latent_channels)
    if vae.latent_channels != model.latent_channels:
        raise ValueError(f"VAE has {vae.latent_channels} latent channels, diffusion model {model.latent_channels}")
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return ModelBundle(vae=vae, diffusion=model, info=info, sched_cfg=sched_cfg, stats=stats, device=device)


# ----------------------------------------------------------------------------- slices


def sampled_slices(bl_iph: np.ndarray, spacing_z: float, margin_mm: float) -> np.ndarray:
    """Slice indices to sample: the baseline IPH z-extent ± ``margin_mm`` (whole slices), clamped to the grid.

    Only the baseline is known at inference, so the follow-up z-range cannot be used here.
    """
    hits = np.flatnonzero(np.asarray(bl_iph).any(axis=(0, 1)))
    if len(hits) == 0:
        raise ValueError("baseline IPH mask is empty on the model grid")
    pad = int(math.floor(margin_mm / spacing_z + 1e-6))
    return np.arange(max(0, hits[0] - pad), min(bl_iph.shape[2], hits[-1] + pad + 1))


def context_slices(zs: np.ndarray, context: int, step: int, nz: int) -> np.ndarray:
    """``[S, context]`` slice indices of each sampled slice's 2.5D context (z order), clamped to the grid."""
    half = context // 2
    offsets = step * np.arange(-half, half + 1)
    return np.clip(np.asarray(zs)[:, None] + offsets[None, :], 0, nz - 1)


def slice_stack(ct_hu: np.ndarray, iph: np.ndarray, ivh: np.ndarray, zs: Sequence[int],
                hu_window: Sequence[float]) -> np.ndarray:
    """VAE inputs ``[n, 3, H, W]`` of slices ``zs`` in the shard image layout, exactly as training
    builds them (:func:`hemexp.vae.data.vae_channels`)."""
    return np.stack([np.stack(vae_channels(slice_image(ct_hu, z), slice_image(iph, z), slice_image(ivh, z),
                                           hu_window)) for z in zs])


@torch.no_grad()
def encode(vae: Any, images: np.ndarray, device: torch.device, batch: int = 64) -> torch.Tensor:
    """Posterior-mean latents ``[n, C, h, w]`` (CPU float32) of VAE inputs ``[n, 3, H, W]``."""
    out = [vae.encode_mean(torch.from_numpy(images[i:i + batch]).to(device)).float().cpu()
           for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def decode_probabilities(vae: Any, z: torch.Tensor, device: torch.device,
                         batch: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latents ``[M, C, h, w]`` -> (CT in [0, 1], P(IPH), P(IVH)), each ``[M, H, W]`` float32."""
    ct, iph, ivh = [], [], []
    for i in range(0, len(z), batch):
        out = vae.decode(z[i:i + batch].to(device))
        ct.append(out["ct"][:, 0].float().clamp(0.0, 1.0).cpu().numpy())
        iph.append(torch.sigmoid(out["iph_logits"][:, 0].float()).cpu().numpy())
        ivh.append(torch.sigmoid(out["ivh_logits"][:, 0].float()).cpu().numpy())
    return np.concatenate(ct), np.concatenate(iph), np.concatenate(ivh)


def decode(vae: Any, z: torch.Tensor, device: torch.device, threshold: float,
           batch: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latents ``[M, C, h, w]`` -> (CT in [0, 1], IPH mask, IVH mask), each ``[M, H, W]``; masks are
    sigmoid(logit) > ``threshold`` as uint8."""
    ct, iph, ivh = decode_probabilities(vae, z, device, batch)
    return ct, (iph > threshold).astype(np.uint8), (ivh > threshold).astype(np.uint8)


@dataclass(frozen=True)
class DecodeReference:
    """What residual decoding adds a sample's decoded change to, on the sampled slices ``[S, H, W]``:
    the baseline itself (windowed CT, IPH, IVH: the VAE inputs) and the VAE's decoding of the baseline
    latents (CT, P(IPH), P(IVH))."""

    inputs: np.ndarray  # [S, 3, H, W]
    decoded: tuple[np.ndarray, np.ndarray, np.ndarray]


def decode_reference(bundle: ModelBundle, baseline: dict[str, np.ndarray], enc: EncodedBaseline,
                     hu_window: Sequence[float], batch: int = 64) -> DecodeReference:
    """The baseline slices and their VAE round trip: decoded once per patient, reused by every sample."""
    inputs = slice_stack(baseline["ct"], baseline["iph"], baseline["ivh"], enc.zs, hu_window)
    z_bl = denormalise(enc.centre, bundle.stats)
    return DecodeReference(inputs=inputs, decoded=decode_probabilities(bundle.vae, z_bl, bundle.device, batch))


def decode_followups(bundle: ModelBundle, z_fu: torch.Tensor, n_samples: int, mode: str, threshold: float,
                     batch: int = 64, reference: DecodeReference | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``n_samples`` × S follow-up latents ``[N*S, C, h, w]`` -> (CT [0, 1], IPH, IVH) ``[N*S, H, W]``.

    ``absolute`` (``sampling.decode``): the decoder's image of ``z_bl + Δz``, the paper's decoding; its
    volumes carry the VAE's reconstruction error of the whole hematoma, not only of the change.
    ``residual``: the baseline plus the decoded *change*, ``x_bl + D(z_bl + Δz) − D(z_bl)`` (CT, and
    the masks' probabilities before the threshold), so Δz = 0 returns the baseline exactly and the
    VAE's systematic error at this anatomy cancels; only the learned change reaches the volumes.
    """
    return decode_followups_modes(bundle, z_fu, n_samples, (mode,), threshold, batch, reference)[mode]


def decode_followups_modes(bundle: ModelBundle, z_fu: torch.Tensor, n_samples: int, modes: Sequence[str],
                           threshold: float, batch: int = 64, reference: DecodeReference | None = None
                           ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`decode_followups` under every mode in ``modes`` from **one** decoder pass: both modes
    start from ``D(z_bl + Δz)``, residual only adds the baseline's correction."""
    bad = [m for m in modes if m not in DECODE_MODES]
    if bad:
        raise ValueError(f"sampling.decode must be one of {DECODE_MODES}, got {bad[0]!r}")
    if "residual" in modes and reference is None:
        raise ValueError("residual decoding needs the baseline's DecodeReference")
    decoded = decode_probabilities(bundle.vae, z_fu, bundle.device, batch)
    out = {}
    for mode in modes:
        ct, p_iph, p_ivh = decoded
        if mode == "residual":
            shape = (n_samples, len(reference.inputs), *ct.shape[1:])
            parts = [(reference.inputs[None, :, k] + (d.reshape(shape) - reference.decoded[k][None])).reshape(d.shape)
                     for k, d in enumerate(decoded)]
            ct, p_iph, p_ivh = np.clip(parts[0], 0.0, 1.0), parts[1], parts[2]
        out[mode] = (ct, (p_iph > threshold).astype(np.uint8), (p_ivh > threshold).astype(np.uint8))
    return out


@dataclass(frozen=True)
class EncodedBaseline:
    """One baseline as the DDIM loop needs it: the sampled slices ``zs`` ``[S]``, the normalised latents
    of each one's 2.5D context ``cond`` ``[S, C*context, h, w]`` and of the slices themselves ``centre``
    ``[S, C, h, w]`` (the Δz origin)."""

    zs: np.ndarray
    cond: torch.Tensor
    centre: torch.Tensor


def encode_baseline(bundle: ModelBundle, baseline: dict[str, np.ndarray], spacing_z: float, z_margin_mm: float,
                    hu_window: Sequence[float], batch: int = 64) -> EncodedBaseline:
    """Window and encode a model-grid baseline (``ct`` HU, ``iph``, ``ivh``) once for every sample.

    Slices: the baseline IPH z-extent ± ``z_margin_mm``; each context slice is encoded once even when
    several sampled slices share it. One function for ``hemexp sample``/``simulate`` and the guidance
    study, so both condition the model on the same latents.
    """
    model = bundle.diffusion
    zs = sampled_slices(baseline["iph"], spacing_z, z_margin_mm)
    ctx = context_slices(zs, model.context, bundle.step_slices, baseline["iph"].shape[2])
    needed = np.unique(ctx)
    images = slice_stack(baseline["ct"], baseline["iph"], baseline["ivh"], needed, hu_window)
    z_bl = normalise(encode(bundle.vae, images, bundle.device, batch), bundle.stats)
    row = {int(z): i for i, z in enumerate(needed)}
    cond = torch.stack([z_bl[[row[int(z)] for z in c]].flatten(0, 1) for c in ctx])
    return EncodedBaseline(zs=zs, cond=cond, centre=z_bl[[row[int(z)] for z in zs]])


@dataclass
class FollowupSlices:
    """Decoded follow-up samples on the sampled slices: ``ct_hu``, ``iph``, ``ivh`` ``[N, S, H, W]``."""

    zs: np.ndarray
    flags: tuple[int, ...]
    ct_hu: np.ndarray
    iph: np.ndarray
    ivh: np.ndarray
    info: dict[str, Any]


def generate_followups(bundle: ModelBundle, baseline: dict[str, np.ndarray], spacing_z: float,
                       clinical: np.ndarray, flags: Sequence[int], settings: SamplerSettings,
                       z_margin_mm: float, mask_threshold: float, hu_window: Sequence[float],
                       progress: Progress | None = None, sample_ids: Sequence[int] | None = None) -> FollowupSlices:
    """Sample N follow-ups of one patient from its model-grid baseline (``ct`` HU, ``iph``, ``ivh``).

    Encode the sampled slices and their context with the frozen VAE, draw normalised Δz, decode
    ``denormalise(normalise(z_bl) + Δz)`` (absolutely or as a change to the baseline,
    ``settings.decode``: :func:`decode_followups`) and threshold the mask heads. ``clinical`` is ``[7]`` or one
    row per sample ``[N, 7]``; ``sample_ids`` key the noise (default 0..N-1; equal ids = common noise).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    enc = encode_baseline(bundle, baseline, spacing_z, z_margin_mm, hu_window, settings.decode_batch)
    zs = enc.zs
    timings["encode_s"] = time.perf_counter() - t0
    delta, run = sample_deltas(bundle.diffusion, bundle.sched_cfg, enc.cond,
                               torch.as_tensor(np.asarray(clinical, np.float32)), flags, settings, slice_ids=zs,
                               sample_ids=sample_ids, progress=progress, slice_spacing_mm=spacing_z)
    timings["sample_s"] = run.pop("seconds")
    t1 = time.perf_counter()
    z_fu = denormalise(enc.centre.unsqueeze(0) + delta, bundle.stats).flatten(0, 1)
    reference = (decode_reference(bundle, baseline, enc, hu_window, settings.decode_batch)
                 if settings.decode == "residual" else None)
    ct01, iph, ivh = decode_followups(bundle, z_fu, len(flags), settings.decode, mask_threshold,
                                      settings.decode_batch, reference)
    timings["decode_s"] = time.perf_counter() - t1
    n, s = len(flags), len(zs)
    shape = (n, s, *ct01.shape[1:])
    return FollowupSlices(zs=zs, flags=tuple(int(f) for f in flags), ct_hu=unwindow_ct(ct01, hu_window).reshape(shape),
                          iph=iph.reshape(shape), ivh=ivh.reshape(shape),
                          info={**run, "timings_s": timings, "device": str(bundle.device)})
