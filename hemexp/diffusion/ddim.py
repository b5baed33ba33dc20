"""The one guided sampling loop: classifier-free guidance on the clinical branch, items in chunks.

The loop runs DDIM (MONAI) or a multistep solver (DPM-Solver++ 2M, UniPC; :mod:`hemexp.diffusion.solvers`):
``sched`` is whatever :func:`hemexp.diffusion.solvers.make_scheduler` built.

Every sampler of HemExp runs :func:`ddim_loop`: the training sample grid
(:func:`hemexp.diffusion.train.sample_grid`, through :func:`ddim_sample`) and, through
:func:`hemexp.sampling.sampler.sample_deltas`, ``hemexp sample``, ``hemexp simulate`` and the guidance
study. It lives in the diffusion stage because the training grid needs it and a stage may import only
earlier ones; the sampling stage adds what is sampling policy: per-item seeded noise, chunk sizes
derived from free memory, encoding, decoding and 3D reassembly.

Guidance (paper §2.4, Ho & Salimans 2022) acts on the model's v-prediction. Two rules
(``sampling.guidance_rule``):

* ``cfg``: ``v = v_null + s · (v_cond − v_null)``; s = 0 is the null clinical embedding, 1 the
  conditional model, > 1 stronger.
* ``projected``: the reference code's update (lucidrains' ``remove_parallel_component``, the projection
  of Sadat et al. 2024, "Eliminating oversaturation and artifacts of high guidance scales"):
  ``v = v_cond + (s − 1) · (u⊥ + k · u∥)`` with ``u = v_cond − v_null`` split, per item, into its parts
  parallel and orthogonal to ``v_cond``, and k = ``sampling.keep_parallel`` (0 in the reference). k = 1 is
  plain CFG. The arithmetic is diffusers' ``normalized_guidance`` (its APG guider).

Only the branches a scale needs are run (:func:`branches`): s = 1 (or a variant without a clinical
branch) runs the conditional rows only, s = 0 under ``cfg`` the null rows only, anything else both — as
one batch of 2B rows.

η > 0: MONAI's ``DDIMScheduler.step`` draws η-noise for the whole batch from one generator, which would
tie a sample's noise to the chunking; :func:`ddim_step` therefore takes MONAI's x0 prediction and adds
the caller's per-item noise itself (DDIM eq. 12 with σ from MONAI's ``_get_variance``). η = 0 uses
MONAI's step unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hemexp.diffusion import solvers
from hemexp.diffusion.model import ConditionalLatentUNet, ddim_scheduler

Progress = Callable[[int, int], None]  # (U-Net calls done, calls in total)
StepNoise = Callable[[np.ndarray], torch.Tensor]  # item indices -> their η-noise of one step [n, C, h, w]


GUIDANCE_RULES = ("cfg", "projected")


def check_rule(rule: str) -> str:
    if rule not in GUIDANCE_RULES:
        raise ValueError(f"unknown guidance rule {rule!r}; choose one of {', '.join(GUIDANCE_RULES)}")
    return rule


def branches(model: ConditionalLatentUNet, guidance_scale: float, rule: str = "cfg") -> tuple[str, ...]:
    """The U-Net branches a guidance scale needs under ``rule``: ('cond',), ('null',) or ('cond', 'null').

    The projected rule at s = 0 still needs both: its update starts from ``v_cond``."""
    if guidance_scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
    if not model.uses_clinical or guidance_scale == 1.0:
        return ("cond",)
    if guidance_scale == 0.0 and check_rule(rule) == "cfg":
        return ("null",)
    return ("cond", "null")


def combine(v_cond: torch.Tensor, v_null: torch.Tensor, scale: float, rule: str = "cfg",
            keep_parallel: float = 0.0) -> torch.Tensor:
    """Guided prediction from the two branches under ``rule`` (module docstring)."""
    if check_rule(rule) == "cfg":
        return v_null + scale * (v_cond - v_null)
    from diffusers.guiders.adaptive_projected_guidance import normalized_guidance

    return normalized_guidance(v_cond, v_null, scale - 1.0, eta=float(keep_parallel),
                               use_original_formulation=True).to(v_cond.dtype)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for 'bf16', or for 'auto' on CUDA; a no-op otherwise ('32')."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def guided_v(model: ConditionalLatentUNet, x: torch.Tensor, t: torch.Tensor, baseline: torch.Tensor,
             clinical: torch.Tensor | None, flag: torch.Tensor | None, scale: float,
             which: tuple[str, ...], rule: str = "cfg", keep_parallel: float = 0.0) -> torch.Tensor:
    """Guided v-prediction (:func:`combine` under ``rule``) from the branches in ``which`` (float32).

    ``clinical``/``flag`` may be None for a variant that does not use them.
    """
    b = x.shape[0]
    if len(which) == 1:
        drop = torch.full((b,), which[0] == "null", dtype=torch.bool, device=x.device)
        return model(x, t, baseline, clinical, flag, drop).float()
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
    two = [None if a is None else torch.cat([a, a]) for a in (x, t, baseline, clinical, flag)]
    v_cond, v_null = model(*two, drop).float().chunk(2)
    return combine(v_cond, v_null, scale, rule, keep_parallel)


def ddim_step(sched: Any, v: torch.Tensor, t: int, x: torch.Tensor, eta: float,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t-1} from x_t: MONAI's ``DDIMScheduler.step`` for η = 0; for η > 0 MONAI's x0 prediction and
    DDIM eq. 12 with the caller's per-item ``noise`` (see module docstring for why)."""
    if eta == 0.0:
        return sched.step(v, t, x)[0]
    _, x0 = sched.step(v, t, x, eta=0.0)
    prev = t - sched.num_train_timesteps // sched.num_inference_steps
    a_t = sched.alphas_cumprod[t].to(x.device, x.dtype)
    a_prev = (sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod).to(x.device, x.dtype)
    sigma = eta * sched._get_variance(t, prev).to(x.device, x.dtype).sqrt()
    eps = (x - a_t.sqrt() * x0) / (1.0 - a_t).sqrt()
    return a_prev.sqrt() * x0 + (1.0 - a_prev - sigma**2).sqrt() * eps + sigma * noise.to(x.device, x.dtype)


def _rows(tensor: torch.Tensor | None, index: np.ndarray, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor[index].to(device)


@torch.no_grad()
def ddim_loop(model: ConditionalLatentUNet, sched: Any, noise: torch.Tensor, baseline: torch.Tensor,
              clinical: torch.Tensor | None, flags: torch.Tensor | None, guidance_scale: float = 1.0,
              eta: float = 0.0, *, base_index: np.ndarray | None = None, cond_index: np.ndarray | None = None,
              step_noise: StepNoise | None = None, chunk_rows: int | None = None, precision: str = "32",
              channels_last: bool = False, progress: Progress | None = None, guidance_rule: str = "cfg",
              keep_parallel: float = 0.0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the guided chain (DDIM or a multistep solver) of every item; ``(Δz [M, C, h, w] float32 on CPU, run info)``.

    The chain runs in the model's own space (``x_0 = Δz / model.delta_scale``); what it returns is
    normalised Δz, whatever the model's scale, so no caller needs to know it.

    Items are the rows of ``noise`` (their x_T). Item i is conditioned on baseline row ``base_index[i]``
    of ``baseline`` ``[S, C*context, h, w]`` and on clinical/flag row ``cond_index[i]`` of ``clinical``
    ``[N, 7]`` and ``flags`` ``[N]`` (indices default to i; None inputs for variants that ignore them),
    so callers need not copy a shared baseline per item. ``step_noise(idx)`` gives the η-noise of items
    ``idx`` for one step (needed when η > 0). ``chunk_rows``: U-Net batch rows per call (a guided item
    costs two; None = every item in one call). ``precision`` as :func:`autocast`; ``channels_last``
    puts x and the baseline in channels-last memory (faster convolutions on CUDA). ``guidance_rule`` and
    ``keep_parallel``: see :func:`combine`.

    Run info: ``chunk_rows``, ``branches``, ``unet_calls``, ``items``, ``seconds``.
    """
    device = next(model.parameters()).device
    m = noise.shape[0]
    base_index = np.arange(m) if base_index is None else np.asarray(base_index)
    cond_index = np.arange(m) if cond_index is None else np.asarray(cond_index)
    if eta > 0 and step_noise is None:
        raise ValueError("eta > 0 needs step_noise")
    if eta > 0 and solvers.is_multistep(sched):
        raise ValueError("a multistep solver is deterministic: eta must be 0")
    which = branches(model, guidance_scale, guidance_rule)
    rows_per_item = len(which)
    chunk = m if chunk_rows is None else max(1, int(chunk_rows) // rows_per_item)
    out = torch.empty(noise.shape, dtype=torch.float32)
    starts = range(0, m, chunk)
    total_calls, calls = len(starts) * len(sched.timesteps), 0
    t0 = time.perf_counter()
    for start in starts:
        idx = np.arange(start, min(start + chunk, m))
        chain = solvers.fresh(sched)  # a multistep solver's history belongs to one chunk's chain
        x, base = noise[idx].to(device), baseline[base_index[idx]].to(device)
        clin, flag = _rows(clinical, cond_index[idx], device), _rows(flags, cond_index[idx], device)
        if channels_last:
            x, base = x.contiguous(memory_format=torch.channels_last), base.contiguous(memory_format=torch.channels_last)
        for t in chain.timesteps:
            tt = torch.full((len(idx),), int(t), dtype=torch.long, device=device)
            with autocast(device, precision):
                v = guided_v(model, x, tt, base, clin, flag, guidance_scale, which, guidance_rule, keep_parallel)
            if solvers.is_multistep(chain):
                x = solvers.step(chain, v, int(t), x.float())
            else:
                x = ddim_step(chain, v, int(t), x.float(), eta, step_noise(idx) if eta > 0 else None)
            calls += 1
            if progress is not None:
                progress(calls, total_calls)
        out[idx] = x.float().cpu() * model.delta_scale  # the model's x_0 -> normalised Δz
    info = {"chunk_rows": int(chunk * rows_per_item), "branches": list(which), "unet_calls": calls,
            "items": m, "seconds": time.perf_counter() - t0}
    return out, info


def ddim_sample(model: ConditionalLatentUNet, sched_cfg: dict[str, Any], baseline: torch.Tensor,
                clinical: torch.Tensor | None, flag: torch.Tensor | None, steps: int,
                guidance_scale: float = 1.0, eta: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised Δz ``[B, C, h, w]`` (on ``baseline``'s device) of one item per batch row, all noise from
    one ``generator``: the training sample grid's entry to :func:`ddim_loop` (float32, one U-Net call
    per step; the sampling stage's per-item noise and chunking are not needed for a preview)."""
    shape = (baseline.shape[0], model.latent_channels, *baseline.shape[-2:])
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.randn(shape, generator=generator, device=gen_device)

    def step_noise(idx: np.ndarray) -> torch.Tensor:
        return torch.randn((len(idx), *shape[1:]), generator=generator, device=gen_device)

    x, _ = ddim_loop(model, ddim_scheduler(sched_cfg, steps), noise, baseline, clinical, flag, guidance_scale,
                     eta, step_noise=step_noise)
    return x.to(baseline.device)
