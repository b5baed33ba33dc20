"""Solver choice for the one guided sampling loop: DDIM (MONAI) or a multistep ODE solver (diffusers).

DPM-Solver++ (2M) (Lu et al. 2022) and UniPC (Zhao et al. 2023) match many-step guided DDIM in far
fewer steps. Both are used exactly as published through diffusers' schedulers, built on the *same*
betas as the MONAI schedule the model was trained with and ``prediction_type`` from the model (v), so
they solve the probability-flow ODE of the trained model, not of another schedule. Nothing is written
by hand here but the adapter: a diffusers scheduler keeps the history of model outputs, so each chunk
of items gets its own fresh copy (:func:`fresh`), and one :func:`step` call serves both families.
The guidance and the per-item initial noise stay in :func:`hemexp.diffusion.ddim.ddim_loop` and the
sampling stage, so every solver keeps clinical-only guidance and noise keyed by (sample, slice).
Multistep solvers are deterministic: ``eta`` must be 0 with them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from hemexp.diffusion.model import ddim_scheduler

SOLVERS = ("ddim", "dpmpp_2m", "unipc")


def make_scheduler(sched_cfg: dict[str, Any], solver: str, steps: int, eta: float = 0.0) -> Any:
    """A scheduler of ``solver`` with ``steps`` steps on the model's training schedule (``sched_cfg``)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r} (choose from {', '.join(SOLVERS)})")
    monai = ddim_scheduler(sched_cfg, steps)
    if solver == "ddim":
        return monai
    if eta != 0.0:
        raise ValueError(f"solver {solver} is deterministic: eta must be 0 (got {eta}); use solver ddim for eta > 0")
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = {"num_train_timesteps": int(sched_cfg["num_train_timesteps"]),
              "trained_betas": monai.betas.double().cpu().numpy(),
              "prediction_type": sched_cfg["prediction_type"], "timestep_spacing": "linspace"}
    if solver == "dpmpp_2m":
        sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    else:
        sched = UniPCMultistepScheduler(solver_order=2, **common)
    sched.set_timesteps(steps)
    return sched


def is_multistep(sched: Any) -> bool:
    """True for a diffusers multistep scheduler (stateful), False for MONAI's DDIM."""
    return hasattr(sched, "model_outputs")


def fresh(sched: Any) -> Any:
    """A scheduler to run one chunk's chain: a copy for a stateful multistep solver, else ``sched``."""
    return copy.deepcopy(sched) if is_multistep(sched) else sched


def step(sched: Any, v: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
    """x at the next timestep from a multistep solver (the model output is the guided v-prediction)."""
    return sched.step(v, t, x).prev_sample
