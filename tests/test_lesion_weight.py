"""Lesion weighting of the diffusion loss (a variant's ``lesion_weight``; hemexp/diffusion/lesion.py):
the weight map on shapes with known answers, the dataset's items, the loss it weights, and the config."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_diffusion_train import diffusion_cfg, module_for, structured

from hemexp.core.config import ConfigError, load_config, validate_config, variants
from hemexp.diffusion.latents import compute_stats
from hemexp.diffusion.lesion import lesion_weight_map
from hemexp.diffusion.train import LatentPairs

torch.set_num_threads(1)


def test_weight_map_raises_the_dilated_baseline_hematoma_by_one_plus_lambda_at_mean_one():
    cells = np.zeros((3, 6, 6), np.float32)
    cells[0, 2, 3] = 0.25  # a sliver of IPH in one cell: its 3x3 neighbourhood is "near"
    cells[2, 0, 0] = 1.0   # at the edge: the neighbourhood is clipped to the 2x2 inside the grid
    w = lesion_weight_map(cells, 4.0)
    assert w.shape == (3, 1, 6, 6) and w.dtype == np.float32
    np.testing.assert_allclose(w.mean(axis=(1, 2, 3)), 1.0, rtol=1e-6)
    near = np.zeros((6, 6), bool)
    near[1:4, 2:5] = True
    np.testing.assert_allclose(w[0, 0][near], 5.0 / (1 + 4.0 * 9 / 36), rtol=1e-6)
    np.testing.assert_allclose(w[0, 0][~near], 1.0 / (1 + 4.0 * 9 / 36), rtol=1e-6)
    np.testing.assert_allclose(w[1], 1.0)  # no baseline IPH: uniform
    assert np.count_nonzero(w[2, 0] > 1) == 4 and w[2, 0, 0, 0] / w[2, 0, 5, 5] == pytest.approx(5.0)
    np.testing.assert_allclose(lesion_weight_map(cells, 0.0), 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        lesion_weight_map(cells, -1.0)
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        lesion_weight_map(cells[0], 1.0)


def _pairs(lesion_weight: float, flips: bool = False) -> tuple[LatentPairs, list]:
    lats = [structured(0, 1), structured(1, 0)]
    lats[0].iph_bl_cells[:] = 0.0
    lats[0].iph_bl_cells[:, 0, 3] = 1.0  # patient 0: IPH in the top-right cell of every slice
    return LatentPairs(lats, compute_stats(lats), context=1, step_slices=1, flips=flips,
                       lesion_weight=lesion_weight), lats


def test_items_carry_their_slice_map_and_its_mirror_only_when_weighted():
    ds, lats = _pairs(3.0, flips=True)
    item = ds[1]  # patient 0, target row 2
    expected = lesion_weight_map(lats[0].iph_bl_cells, 3.0)[2]
    torch.testing.assert_close(item["weight"], torch.from_numpy(expected))
    torch.testing.assert_close(item["weight_flip"], torch.from_numpy(expected).flip(-1))
    assert float(item["weight"][0, 0, 3]) > float(item["weight"][0, 3, 0])  # near the IPH, not the far corner
    assert "weight" not in _pairs(0.0)[0][1]


def test_loss_weights_each_cells_error_by_the_map_and_mirrors_it_with_the_slice():
    ds, _ = _pairs(3.0, flips=True)
    plain, _ = _pairs(0.0, flips=True)
    module = module_for(diffusion_cfg(min_snr_gamma=None))
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    uniform = {k: torch.stack([plain[i][k] for i in range(4)]) for k in plain[0]}
    draws = module.draws(4, (4, 4, 4, 4), step=0, micro=0)
    keep = {**draws, "flip": torch.zeros(4, dtype=torch.bool)}
    with torch.no_grad():
        weighted, mse = module.loss(batch, keep)
        unweighted, mse_plain = module.loss(uniform, keep)
        x_t = module.scheduler.add_noise(batch["delta"], keep["noise"], keep["t"])
        pred = module.model(x_t, keep["t"], batch["baseline"], batch["clinical"], batch["flag"], keep["drop"])
        err = (pred - module.scheduler.get_velocity(batch["delta"], keep["noise"], keep["t"])).pow(2)
        mirrored = module.loss({**batch, "delta": batch["delta_flip"], "baseline": batch["baseline_flip"],
                                "weight": batch["weight_flip"]}, keep)[0]
        all_flipped = module.loss(batch, {**draws, "flip": torch.ones(4, dtype=torch.bool)})[0]
    torch.testing.assert_close(mse, mse_plain)  # the reported MSE stays unweighted
    torch.testing.assert_close(unweighted, err.mean())
    torch.testing.assert_close(weighted, (err * batch["weight"]).mean(dim=(1, 2, 3)).mean())
    assert not torch.isclose(weighted, unweighted)
    torch.testing.assert_close(all_flipped, mirrored)


def test_variant_key_is_parsed_and_a_negative_weight_is_refused():
    cfg = load_config(None)
    cfg["diffusion"]["variants"]["2D-ice-lw"] = {"context": 1, "conditioning": "ice", "lesion_weight": 4}
    validate_config(cfg)
    assert variants(cfg)["2D-ice-lw"].lesion_weight == 4.0
    assert all(v.lesion_weight == 0.0 for name, v in variants(cfg).items() if name != "2D-ice-lw")
    bad = copy.deepcopy(cfg)
    bad["diffusion"]["variants"]["2D-ice-lw"]["lesion_weight"] = -1
    with pytest.raises(ConfigError, match="lesion_weight"):
        validate_config(bad)
