"""Sampling solvers (DDIM, DPM-Solver++ 2M, UniPC) through the one guided loop, on a known answer.

For Gaussian data x0 ~ N(mu, s^2) the exact v-prediction is known in closed form, and the
probability-flow ODE maps x_T to x0 = mu + s (x_T - sqrt(a_T) mu) / sqrt(a_T s^2 + 1 - a_T): every
deterministic solver must recover that map, the multistep ones in few steps. Chunking must not change
a multistep solver's result (its history belongs to one chain), and eta > 0 is refused for them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hemexp.diffusion.ddim import ddim_loop
from hemexp.diffusion.solvers import SOLVERS, make_scheduler

SCHED = {"num_train_timesteps": 1000, "schedule": "sigmoid_beta", "prediction_type": "v_prediction"}
MU, S = 0.7, 0.4


class GaussianOracle(torch.nn.Module):
    """The exact v-prediction for x0 ~ N(MU, S^2) per element (what a perfect model would output)."""

    uses_clinical = False
    latent_channels = 2
    delta_scale = 1.0  # diffuses Δz as it is (ConditionalLatentUNet's contract)

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # ddim_loop reads the device from a parameter
        self.register_buffer("abar", alphas_cumprod.double())

    def forward(self, x, t, baseline, clinical, flag, drop=None):
        a = self.abar[t].view(-1, 1, 1, 1)
        x = x.double()
        x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()


def _run(solver: str, steps: int, chunk_rows: int | None = None):
    sched = make_scheduler(SCHED, solver, steps)
    abar = make_scheduler(SCHED, "ddim", steps).alphas_cumprod
    model = GaussianOracle(abar)
    noise = torch.randn(12, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    base = torch.zeros(12, 2, 4, 4)
    x0, info = ddim_loop(model, sched, noise, base, None, None, chunk_rows=chunk_rows)
    a_t = float(abar[int(sched.timesteps[0])])
    exact = MU + S * (noise.double() - a_t**0.5 * MU) / (a_t * S**2 + 1 - a_t) ** 0.5
    return float((x0.double() - exact).abs().max()), info


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_recovers_the_exact_flow_map(solver):
    err, info = _run(solver, 100)
    assert err < 0.025, (solver, err)  # 5 % of the data SD at worst (DDIM's first-order error)
    assert info["unet_calls"] == 100


def test_multistep_solvers_need_fewer_steps_than_ddim():
    ddim = {n: _run("ddim", n)[0] for n in (10, 15, 20, 25, 50)}
    for solver in ("dpmpp_2m", "unipc"):
        errs = {n: _run(solver, n)[0] for n in (10, 15, 20, 25)}
        assert all(errs[n] < ddim[n] for n in errs), (solver, errs, ddim)
        assert errs[25] < ddim[50], (solver, errs[25], ddim[50])  # half the steps, at least as exact


@pytest.mark.parametrize("solver", ("dpmpp_2m", "unipc"))
def test_chunking_does_not_change_a_multistep_solver(solver):
    whole, _ = _run(solver, 12)
    chunked, info = _run(solver, 12, chunk_rows=5)
    assert info["chunk_rows"] == 5 and whole == pytest.approx(chunked, abs=1e-6)


def test_eta_is_refused_for_deterministic_solvers():
    with pytest.raises(ValueError, match="eta must be 0"):
        make_scheduler(SCHED, "dpmpp_2m", 10, eta=0.5)
    with pytest.raises(ValueError, match="unknown solver"):
        make_scheduler(SCHED, "euler", 10)
    assert np.isfinite(_run("ddim", 5)[0])
