"""The sampler's noise: how the slices of one sample relate, so that one sample is one 3D follow-up.

The diffusion model is 2D (or 2.5D): every (sample k, slice z) item runs its own DDIM chain. What ties
the S slices of sample k into one follow-up is their noise. With independent noise per slice
(``sampling.slice_noise: independent``, the behaviour of earlier releases and of the paper's reference
code) a "sample" is a stack of unrelated slice draws: its total volume averages S independent slice
errors, which shrinks the spread of sampled volumes by up to √S, and its voxel-wise maps disagree
between neighbouring slices. Two coherent alternatives:

* ``shared`` (default): one noise field per sample, the same for every slice. With deterministic DDIM
  (η = 0) the slices of a sample then differ only through their baselines, so the sample's random
  part (how much this hematoma grows, where) is one draw for the whole hematoma, as in a real
  follow-up; neighbouring slices, whose baselines are alike, get alike Δz.
* ``correlated``: a Gauss–Markov (AR(1)) field along z with correlation ``exp(-Δz / ℓ)`` between
  slices Δz mm apart (ℓ = ``sampling.noise_correlation_mm``): coherent over a hematoma's extent,
  independent far apart; every slice is still marginally N(0, I), as the model was trained on.

All modes are keyed, not streamed: the noise of item (k, z) at step t is a function of (seed, k, z, t)
alone (``shared``: of (seed, k, t); ``correlated``: of the item's slice set too), so it does not depend
on the chunking, on the order items are run, or on which other samples are drawn alongside. The
``independent`` mode keeps the per-item generator streams of earlier releases, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

MODES = ("shared", "correlated", "independent")
_SHARED_SLICE = -1  # the slice key of the one field every slice of a sample shares
_INITIAL_STEP = -1  # the step key of x_T (η-noise steps are 0, 1, ...)


def item_generators(seed: int, sample_ids: Sequence[int], slice_ids: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per (sample, slice) item, sample-major, seeded from (seed, sample, slice z)."""
    return [_generator(seed, k, z) for k in sample_ids for z in slice_ids]


def draw(gens: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per generator, stacked: ``[len(gens), *shape]``."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def _generator(seed: int, *key: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) for k in key)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _keyed(seed: int, k: int, z: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    # 4 key words (never the 3-word keys of the independent mode), shifted to be non-negative
    return torch.randn(shape, generator=_generator(seed, k, z + 1, step + 2))


def ar1_weights(z_mm: Sequence[float], length_mm: float) -> np.ndarray:
    """Lower-triangular W with x = W e an AR(1) field along z (x_0 = e_0, x_i = ρ_i x_{i-1} +
    √(1-ρ_i²) e_i, ρ_i = exp(-|z_i - z_{i-1}| / ℓ)): unit variance per slice, corr exp(-Δz / ℓ)."""
    z = np.asarray(z_mm, dtype=float)
    if len(z) and np.any(np.diff(z) < 0):
        raise ValueError("slice positions must be sorted along z")
    n = len(z)
    w = np.zeros((n, n))
    for i in range(n):
        if i == 0:
            w[0, 0] = 1.0
            continue
        rho = math.exp(-abs(z[i] - z[i - 1]) / length_mm) if length_mm > 0 else 0.0
        w[i] = rho * w[i - 1]
        w[i, i] = math.sqrt(max(0.0, 1.0 - rho * rho))
    return w


class SliceNoise:
    """Initial and η-step noise of the items (sample-major: item i = sample i // S, slice i % S)."""

    def __init__(self, mode: str, seed: int, sample_ids: Sequence[int], slice_ids: Sequence[int],
                 shape: tuple[int, ...], slice_spacing_mm: float | None = None, correlation_mm: float = 30.0):
        if mode not in MODES:
            raise ValueError(f"sampling.slice_noise must be one of {MODES}, got {mode!r}")
        if mode == "correlated" and slice_spacing_mm is None:
            raise ValueError("correlated slice noise needs the slice spacing (mm)")
        self.mode, self.seed, self.shape = mode, int(seed), tuple(shape)
        self.sample_ids, self.slice_ids = [int(k) for k in sample_ids], [int(z) for z in slice_ids]
        self.n_slices = len(self.slice_ids)
        self._steps: dict[int, int] = {}  # item -> η-steps drawn so far (ddim_loop asks once per step)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}  # (sample, step) -> [S, *shape] (correlated)
        self._weights = None
        if mode == "correlated":
            order = np.argsort(self.slice_ids, kind="stable")
            z_mm = np.asarray(self.slice_ids, dtype=float)[order] * float(slice_spacing_mm)
            w_sorted = ar1_weights(z_mm, float(correlation_mm))
            w = np.zeros_like(w_sorted)
            w[np.ix_(order, order)] = w_sorted  # back to the caller's slice order
            self._weights = torch.from_numpy(w).float()
        if mode == "independent":
            self._gens = item_generators(seed, self.sample_ids, self.slice_ids)

    def initial(self) -> torch.Tensor:
        """x_T of every item, ``[N*S, *shape]``."""
        if self.mode == "independent":
            return draw(self._gens, self.shape)
        return torch.cat([self._sample_field(k, _INITIAL_STEP) for k in self.sample_ids])

    def step(self, idx: np.ndarray) -> torch.Tensor:
        """The next η-step noise of items ``idx`` (each item's n-th call is its step n)."""
        if self.mode == "independent":
            return draw([self._gens[i] for i in idx], self.shape)
        out = []
        for i in map(int, idx):
            t = self._steps.get(i, 0)
            self._steps[i] = t + 1
            k, s = self.sample_ids[i // self.n_slices], i % self.n_slices
            out.append(self._sample_field(k, t)[s])
        return torch.stack(out)

    def _sample_field(self, k: int, step: int) -> torch.Tensor:
        """``[S, *shape]``: the noise of sample k's slices at one step."""
        if self.mode == "shared":
            return _keyed(self.seed, k, _SHARED_SLICE, step, self.shape).expand(self.n_slices, *self.shape).clone()
        key = (k, step)
        if key not in self._cache:
            e = torch.stack([_keyed(self.seed, k, z, step, self.shape) for z in self.slice_ids])
            field = torch.einsum("ij,j...->i...", self._weights, e)
            if step == _INITIAL_STEP:
                return field
            self._cache[key] = field
        return self._cache[key]
