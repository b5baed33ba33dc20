"""Slice noise: one sample is one coherent 3D follow-up (hemexp.sampling.noise).

Independent noise per slice (earlier releases) makes a "sample" a stack of unrelated slice draws; the
shared and correlated modes tie a sample's slices together while keeping every slice N(0, I) and the
keying (a sample's noise does not depend on which other samples or chunks are drawn).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sampling import LATENT_C, SCHED, tiny_diffusion

from hemexp.sampling.noise import SliceNoise, ar1_weights, draw, item_generators
from hemexp.sampling.sampler import SamplerSettings, sample_deltas

SHAPE = (LATENT_C, 8, 8)


def test_independent_mode_is_the_per_item_generators_of_earlier_releases():
    field = SliceNoise("independent", 3, [0, 1], [4, 5, 6], SHAPE)
    assert torch.equal(field.initial(), draw(item_generators(3, [0, 1], [4, 5, 6]), SHAPE))


def test_shared_mode_gives_every_slice_of_a_sample_the_same_field():
    x = SliceNoise("shared", 3, [0, 1, 2], [4, 5, 6, 7], SHAPE).initial().reshape(3, 4, *SHAPE)
    assert all(torch.equal(x[k, z], x[k, 0]) for k in range(3) for z in range(4))
    assert (x[0, 0] - x[1, 0]).abs().max() > 0.5  # samples differ
    alone = SliceNoise("shared", 3, [1], [5, 6], SHAPE).initial()
    assert torch.equal(alone[0], x[1, 0])  # keyed by (seed, sample): other samples/slices do not matter


def test_ar1_weights_give_unit_variance_and_exponential_correlation():
    w = ar1_weights([0.0, 3.0, 6.0, 12.0], 6.0)
    cov = w @ w.T
    assert np.allclose(np.diag(cov), 1.0)
    assert cov[0, 1] == pytest.approx(np.exp(-0.5)) and cov[0, 3] == pytest.approx(np.exp(-2.0))
    assert cov[2, 3] == pytest.approx(np.exp(-1.0))
    with pytest.raises(ValueError, match="sorted"):
        ar1_weights([3.0, 0.0], 6.0)


def test_correlated_field_is_marginally_standard_normal_with_the_stated_correlation():
    n, slices = 600, [10, 11, 13]  # 3 mm slices: gaps of 3 and 6 mm
    x = SliceNoise("correlated", 7, range(n), slices, (16,), slice_spacing_mm=3.0, correlation_mm=6.0).initial()
    x = x.reshape(n, 3, 16).permute(1, 0, 2).reshape(3, -1).numpy()
    assert np.allclose(x.std(axis=1), 1.0, atol=0.05)
    corr = np.corrcoef(x)
    assert corr[0, 1] == pytest.approx(np.exp(-0.5), abs=0.04)
    assert corr[1, 2] == pytest.approx(np.exp(-1.0), abs=0.04)
    assert corr[0, 2] == pytest.approx(np.exp(-1.5), abs=0.04)


def test_correlated_mode_needs_the_slice_spacing_and_modes_are_checked():
    with pytest.raises(ValueError, match="spacing"):
        SliceNoise("correlated", 0, [0], [0, 1], SHAPE)
    with pytest.raises(ValueError, match="slice_noise"):
        SliceNoise("per-voxel", 0, [0], [0], SHAPE)


def _roughness(profile: torch.Tensor) -> float:
    """Mean absolute second difference along z of a [S, ...] profile (0 for a linear trend)."""
    return float((profile[2:] - 2 * profile[1:-1] + profile[:-2]).abs().mean())


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_a_shared_noise_sample_is_as_smooth_along_z_as_its_baseline(eta):
    """With a baseline that varies smoothly along z, a coherent sample's Δz varies smoothly too (the
    slices differ only through their baselines); independent slice noise makes it jump slice to slice."""
    model = tiny_diffusion()
    s = 12
    z = torch.linspace(0, 1, s)[:, None, None, None]
    pattern = torch.randn(1, LATENT_C, 8, 8, generator=torch.Generator().manual_seed(4))
    baseline = pattern * (0.5 + z)  # smooth in z: zero second difference
    clinical = torch.rand(7, generator=torch.Generator().manual_seed(2))
    rough = {}
    for mode in ("independent", "shared", "correlated"):
        settings = SamplerSettings(steps=4, eta=eta, seed=11, chunk_size=64, slice_noise=mode, noise_correlation_mm=60.0)
        delta, _ = sample_deltas(model, SCHED, baseline, clinical, [1, 0, 1, 0], settings,
                                 slice_ids=list(range(s)), slice_spacing_mm=3.0)
        rough[mode] = np.mean([_roughness(delta[k]) for k in range(4)])
    scale = float(delta.abs().mean())
    assert rough["shared"] < 0.25 * rough["independent"], rough
    assert rough["correlated"] < 0.6 * rough["independent"], rough
    if eta == 0.0:
        assert rough["shared"] < 0.05 * scale  # DDIM is deterministic: only the baseline moves Δz
