"""Two ablation keys of a diffusion variant (issue 14): ``flag_channel`` (the expansion flag also as a
constant input plane of the U-Net) and ``max_steps`` (a variant's own training length)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from test_diffusion_model import C, inputs, run
from test_diffusion_train import _cohort

from hemexp.core.config import ConfigError, load_config, validate_config, variants
from hemexp.diffusion.model import (
    ConditionalLatentUNet,
    load_diffusion,
    model_config,
    save_diffusion,
    scheduler_config,
)

UNET = {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
        "norm_num_groups": 4, "clinical_hidden": 16}


def planed(seed: int = 0) -> ConditionalLatentUNet:
    """A tiny ``flag_channel`` U-Net with its zero-initialised convs randomised (as after training)."""
    torch.manual_seed(seed)
    model = ConditionalLatentUNet(C, 1, "ice", **UNET, flag_channel=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.1)
    return model.eval()


def test_flag_plane_is_a_pathway_of_its_own_into_the_first_convolution():
    """With both flag embeddings made equal, only the plane tells the flags apart: flipping the flag still
    moves the output, and stops moving it once the first conv's weights on the plane are zeroed."""
    model = planed()
    first = model.unet.conv_in.conv
    assert first.in_channels == 2 * C + 1
    x = inputs()
    with torch.no_grad():
        emb = model.unet.class_embedding.flag_embedding.weight
        emb[1] = emb[0]
    flipped = 1 - x["flag"]
    assert (run(model, x, flag=flipped) - run(model, x)).abs().max() > 1e-4
    with torch.no_grad():
        first.weight[:, -1] = 0
    torch.testing.assert_close(run(model, x, flag=flipped), run(model, x))


def test_flag_plane_is_never_dropped_with_the_clinical_input():
    """Classifier-free guidance drops only the clinical vector: the null branch keeps the flag, so under
    ``drop_clinical`` the flag still changes the prediction (and the plane is in the same place)."""
    model = planed(1)
    x = inputs()
    drop = torch.ones(4, dtype=torch.bool)
    assert (run(model, x, flag=1 - x["flag"], drop_clinical=drop) - run(model, x, drop_clinical=drop)).abs().max() > 1e-4


def test_flag_channel_round_trips_and_needs_a_flag_conditioned_variant(tmp_path):
    model = planed(2)
    cfg = {**load_config(None)["diffusion"], "unet": UNET}
    save_diffusion(tmp_path / "model.pt", model, model_config(cfg, 1, "ice", C, flag_channel=True), {},
                   scheduler_config(cfg))
    loaded = load_diffusion(tmp_path / "model.pt")[0]
    x = inputs()
    assert loaded.flag_channel
    torch.testing.assert_close(run(loaded, x), run(model, x))
    with pytest.raises(ValueError, match="flag_channel"):
        ConditionalLatentUNet(C, 1, "ic", **UNET, flag_channel=True)


def test_variant_keys_parse_and_bad_values_are_config_errors():
    cfg = load_config(None)
    cfg["diffusion"]["variants"]["2D-ice-fc"] = {"context": 1, "conditioning": "ice", "flag_channel": True,
                                                 "max_steps": 50}
    validate_config(cfg)
    spec = variants(cfg)["2D-ice-fc"]
    assert spec.flag_channel and spec.max_steps == 50
    assert all(not v.flag_channel and v.max_steps is None for n, v in variants(cfg).items() if n != "2D-ice-fc")
    for change, message in (({"conditioning": "ic"}, "flag_channel"), ({"max_steps": 0}, "max_steps")):
        bad = copy.deepcopy(cfg)
        bad["diffusion"]["variants"]["2D-ice-fc"].update(change)
        with pytest.raises(ConfigError, match=message):
            validate_config(bad)


@pytest.mark.slow
def test_a_variants_max_steps_and_flag_channel_reach_the_trained_model(tmp_path):
    """``train-diffusion`` trains a variant for its own ``max_steps`` (not the section's) and saves the
    flag-plane U-Net; the other variants keep the section's length."""
    from hemexp.cli import main

    cfg, path = _cohort(tmp_path)
    cfg["diffusion"]["variants"]["2D-ice-fc"] = {"context": 1, "conditioning": "ice", "flag_channel": True,
                                                 "max_steps": 3}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train-diffusion", "2D-ice-fc", "--config", str(path)]) == 0
    run_dir = Path(cfg["results_dir"]) / "models" / "diffusion" / "2D-ice-fc"
    summary = yaml.safe_load((run_dir / "summary.json").read_text())
    model, info, _ = load_diffusion(run_dir / "model.pt")
    assert summary["steps"] == 3 != cfg["diffusion"]["max_steps"]
    assert model.flag_channel and info["flag_channel"]
