"""Conditional U-Net, conditioning embedding, schedule helpers and the saved-model format."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from hemexp.core.config import load_config
from hemexp.diffusion.conditioning import ConditionEmbedding, pack_condition
from hemexp.diffusion.ddim import ddim_sample
from hemexp.diffusion.model import (
    ConditionalLatentUNet,
    ddim_scheduler,
    ddpm_scheduler,
    load_diffusion,
    min_snr_weight,
    model_config,
    save_diffusion,
    scheduler_config,
    snr,
    x0_eps_from_v,
)

torch.set_num_threads(1)
C, HW = 4, 8


def tiny(conditioning: str = "ice", context: int = 1, seed: int = 0, cross_attention: bool = False
         ) -> ConditionalLatentUNet:
    """A tiny U-Net whose zero-initialised convs (MONAI zero-inits each residual branch's last conv
    and the output conv, so a fresh U-Net ignores t and conditions) are randomised, as after training."""
    torch.manual_seed(seed)
    model = ConditionalLatentUNet(C, context, conditioning, channels=[8, 16], attention_levels=[False, True],
                                  num_res_blocks=1, num_head_channels=8, norm_num_groups=4, clinical_hidden=16,
                                  cross_attention=cross_attention)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.1)
    return model.eval()


def inputs(batch: int = 4, context: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x_t": torch.randn(batch, C, HW, HW, generator=g),
            "t": torch.randint(0, 1000, (batch,), generator=g),
            "baseline": torch.randn(batch, C * context, HW, HW, generator=g),
            "clinical": torch.rand(batch, 7, generator=g),
            "flag": torch.tensor([0, 1] * (batch // 2))}


def run(model: ConditionalLatentUNet, x: dict[str, torch.Tensor], **changes) -> torch.Tensor:
    args = {**x, **changes}
    with torch.no_grad():
        return model(args["x_t"], args["t"], args["baseline"], args["clinical"], args["flag"],
                     args.get("drop_clinical"))


@pytest.mark.parametrize("schedule", ["sigmoid_beta", "linear_beta", "cosine"])
def test_v_target_algebra_recovers_x0_and_eps(schedule):
    sched = DDPMScheduler(num_train_timesteps=1000, schedule=schedule, prediction_type="v_prediction")
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, C, HW, HW, generator=g, dtype=torch.float64)
    eps = torch.randn(6, C, HW, HW, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = sched.add_noise(x0, eps, t)
    v = sched.get_velocity(x0, eps, t)
    x0_hat, eps_hat = x0_eps_from_v(v, x_t, sched.alphas_cumprod, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-10, rtol=0)


def test_min_snr_weights_at_known_snrs():
    s = torch.tensor([0.25, 1.0, 4.0, 9.0])
    torch.testing.assert_close(min_snr_weight(s, 5.0, "v_prediction"), torch.tensor([0.2, 0.5, 0.8, 0.5]))
    torch.testing.assert_close(min_snr_weight(s, 1.0, "v_prediction"), torch.tensor([0.2, 0.5, 0.2, 0.1]))
    torch.testing.assert_close(min_snr_weight(s, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 5 / 9]))
    torch.testing.assert_close(min_snr_weight(s, 5.0, "sample"), torch.tensor([0.25, 1.0, 4.0, 5.0]))
    torch.testing.assert_close(min_snr_weight(s, None, "v_prediction"), torch.ones(4))
    alphas = torch.tensor([0.8, 0.5, 0.2])
    torch.testing.assert_close(snr(alphas, torch.tensor([0, 1, 2])), torch.tensor([4.0, 1.0, 0.25]))


def test_schedule_names_map_to_monai_and_sampling_does_not_clip():
    cfg = load_config(None)["diffusion"]
    sched_cfg = scheduler_config(cfg)
    assert sched_cfg == {"num_train_timesteps": 1000, "schedule": "sigmoid_beta", "prediction_type": "v_prediction"}
    betas = ddpm_scheduler(sched_cfg).betas
    assert betas.shape == (1000,) and torch.all(betas[1:] >= betas[:-1])  # sigmoid ramp
    assert betas[500] == pytest.approx((1e-4 + 2e-2) / 2, rel=0.01)  # midpoint of the sigmoid
    ddim = ddim_scheduler(sched_cfg, 10)
    assert not ddim.clip_sample and len(ddim.timesteps) == 10 and ddim.prediction_type == "v_prediction"


def test_null_embedding_replaces_clinical_exactly_where_dropped():
    torch.manual_seed(0)
    emb = ConditionEmbedding(dim=12, conditioning="ice", hidden=8)
    with torch.no_grad():
        emb.null_clinical.copy_(torch.arange(12.0))
    clinical = torch.rand(4, 7)
    flag = torch.tensor([0, 1, 1, 0])
    drop = torch.tensor([True, False, True, False])
    out = emb(pack_condition(clinical, flag, drop))
    flag_emb = emb.flag_embedding(flag)
    expected_dropped = torch.arange(12.0) + flag_emb
    torch.testing.assert_close(out[drop], expected_dropped[drop])
    torch.testing.assert_close(out[~drop], emb.clinical_mlp(clinical[~drop]) + flag_emb[~drop])
    assert not torch.allclose(out[~drop], expected_dropped[~drop])
    # in the full model: dropped rows do not depend on the clinical values at all
    model, x = tiny("ice"), inputs()
    mask = torch.tensor([True, False, True, False])
    a = run(model, x, drop_clinical=mask)
    b = run(model, x, drop_clinical=mask, clinical=torch.rand(4, 7))
    torch.testing.assert_close(a[mask], b[mask])
    assert (a[~mask] - b[~mask]).abs().max() > 1e-4


def test_flag_and_clinical_change_the_output_and_variant_i_ignores_them():
    x = inputs()
    other_clinical = {"clinical": 1 - x["clinical"]}
    other_flag = {"flag": 1 - x["flag"]}
    ice, ic, i = tiny("ice"), tiny("ic"), tiny("i")
    base = run(ice, x)
    assert (run(ice, x, **other_flag) - base).abs().max() > 1e-4
    assert (run(ice, x, **other_clinical) - base).abs().max() > 1e-4
    assert (run(ice, x, baseline=x["baseline"] + 1) - base).abs().max() > 1e-4  # the baseline conditions too
    torch.testing.assert_close(run(ic, x, **other_flag), run(ic, x))
    assert (run(ic, x, **other_clinical) - run(ic, x)).abs().max() > 1e-4
    torch.testing.assert_close(run(i, x, **other_flag, **other_clinical), run(i, x))
    torch.testing.assert_close(run(i, x, clinical=None, flag=None), run(i, x))
    with pytest.raises(ValueError, match="expansion flag"):
        run(ice, x, flag=None)


def test_conditional_and_null_branch_in_one_batched_call():
    model, x = tiny("ice", context=3), inputs(context=3)
    both = {k: torch.cat([v, v]) for k, v in x.items()}
    drop = torch.tensor([False] * 4 + [True] * 4)
    out = run(model, both, drop_clinical=drop)
    torch.testing.assert_close(out[:4], run(model, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[4:], run(model, x, drop_clinical=torch.ones(4, dtype=torch.bool)),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        run(model, x, baseline=x["baseline"][:, :C])


def test_save_and_load_diffusion_roundtrip(tmp_path):
    model, x = tiny("ic", context=3), inputs(context=3)
    cfg = load_config(None)["diffusion"]
    cfg = {**cfg, "unet": {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1,
                           "num_head_channels": 8, "norm_num_groups": 4, "clinical_hidden": 16}}
    mcfg = model_config(cfg, 3, "ic", C)
    info = {"name": "2.5D3-ic", "context": 3, "conditioning": "ic"}
    save_diffusion(tmp_path / "model.pt", model, mcfg, info, scheduler_config(cfg))
    loaded, info_back, sched = load_diffusion(tmp_path / "model.pt")
    assert not loaded.training and info_back == info and sched["prediction_type"] == "v_prediction"
    torch.testing.assert_close(run(loaded, x), run(model, x))
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a HemExp diffusion model"):
        load_diffusion(tmp_path / "bad.pt")


def test_ddim_sample_is_seeded_and_guidance_uses_both_branches():
    model, x = tiny("ice"), inputs()
    sched = {"num_train_timesteps": 1000, "schedule": "sigmoid_beta", "prediction_type": "v_prediction"}

    def sample(scale: float, seed: int = 3) -> torch.Tensor:
        return ddim_sample(model, sched, x["baseline"], x["clinical"], x["flag"], steps=4, guidance_scale=scale,
                           generator=torch.Generator().manual_seed(seed))

    a = sample(1.0)
    assert a.shape == (4, C, HW, HW) and torch.isfinite(a).all()
    torch.testing.assert_close(sample(1.0), a)
    assert (sample(1.0, seed=4) - a).abs().max() > 1e-3
    assert (sample(3.0) - a).abs().max() > 1e-5  # guidance > 1 extrapolates away from the null branch


def test_cross_attention_tokens_condition_the_unet_and_drop_like_the_additive_branch(tmp_path):
    """cross_attention: clinical values and flag are also attended tokens; removing the additive
    embedding's effect (zeroing it) leaves the tokens alone moving the output, the null tokens replace
    the clinical ones exactly where dropped, and the saved model round-trips."""
    model, x = tiny("ice", cross_attention=True), inputs()
    assert model.unet.with_conditioning and model.tokens is not None
    tokens = model.tokens(pack_condition(x["clinical"], x["flag"], torch.zeros(4, dtype=torch.bool)))
    assert tokens.shape == (4, 8, 16)  # 7 clinical tokens + the flag token, width 2 x channels[0]
    with torch.no_grad():
        for p in model.unet.class_embedding.parameters():
            p.zero_()  # only the tokens can carry the condition now
    base = run(model, x)
    assert (run(model, x, flag=1 - x["flag"]) - base).abs().max() > 1e-4
    assert (run(model, x, clinical=1 - x["clinical"]) - base).abs().max() > 1e-4
    drop = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(run(model, x, drop_clinical=drop), run(model, x, clinical=1 - x["clinical"],
                                                                        drop_clinical=drop))
    cfg = load_config(None)["diffusion"]
    cfg = {**cfg, "unet": {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1,
                           "num_head_channels": 8, "norm_num_groups": 4, "clinical_hidden": 16}}
    save_diffusion(tmp_path / "model.pt", model, model_config(cfg, 1, "ice", C, cross_attention=True),
                   {"name": "2D-ice-xattn"}, scheduler_config(cfg))
    loaded, _, _ = load_diffusion(tmp_path / "model.pt")
    torch.testing.assert_close(run(loaded, x), base)


def test_unit_delta_scale_is_the_rms_and_the_model_space_is_rescaled_exactly(tmp_path):
    """unit_delta: the scale is Δz's RMS; a model of scale s trained on s·Δz sees exactly the inputs a
    scale-1 model sees on Δz (same loss), its sampled chain comes back in Δz units, and s survives
    saving."""
    from hemexp.diffusion.ddim import ddim_loop
    from hemexp.diffusion.model import delta_rms
    from hemexp.diffusion.train import DiffusionModule

    assert delta_rms([torch.full((C, HW, HW), 0.2), torch.full((C, HW, HW), -0.2)]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="identically zero"):
        delta_rms(torch.zeros(3, C, HW, HW))
    cfg = load_config(None)["diffusion"]
    cfg = {**cfg, "unet": {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1,
                           "num_head_channels": 8, "norm_num_groups": 4, "clinical_hidden": 16}}
    x, scale = inputs(), 0.07
    batch = {"delta": x["x_t"], "baseline": x["baseline"], "clinical": x["clinical"], "flag": x["flag"]}
    losses = []
    for s, factor in ((1.0, 1.0), (scale, scale)):
        torch.manual_seed(0)
        module = DiffusionModule(model_config(cfg, 1, "ice", C, delta_scale=s), scheduler_config(cfg), cfg)
        draws = module.draws(4, tuple(x["x_t"].shape), step=0, micro=0)
        losses.append(module.loss({**batch, "delta": batch["delta"] * factor}, draws)[0])
    torch.testing.assert_close(losses[0], losses[1])
    unit, scaled = tiny("ice"), tiny("ice")
    scaled.delta_scale = scale
    sched = ddim_scheduler(scheduler_config(cfg), 4)
    noise = torch.randn(4, C, HW, HW, generator=torch.Generator().manual_seed(5))
    out_unit, _ = ddim_loop(unit, sched, noise, x["baseline"], x["clinical"], x["flag"])
    out_scaled, _ = ddim_loop(scaled, sched, noise, x["baseline"], x["clinical"], x["flag"])
    torch.testing.assert_close(out_scaled, out_unit * scale)
    save_diffusion(tmp_path / "model.pt", scaled, model_config(cfg, 1, "ice", C, delta_scale=scale), {}, scheduler_config(cfg))
    assert load_diffusion(tmp_path / "model.pt")[0].delta_scale == pytest.approx(scale)


def test_scale_shift_blocks_replace_every_residual_block_and_condition_multiplicatively(tmp_path):
    """scale_shift: every MONAI residual block is wrapped; a block whose embedding projection gives
    scale s and shift b returns skip(x) + conv2(act(GN(h)(1 + s) + b)) (checked against a hand
    computation); the conditions move the output; the saved model round-trips."""
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    from hemexp.diffusion.adagn import ScaleShiftResnetBlock

    torch.manual_seed(0)
    model = ConditionalLatentUNet(C, 1, "ice", channels=[8, 16], attention_levels=[False, True], num_res_blocks=1,
                                  num_head_channels=8, norm_num_groups=4, clinical_hidden=16, scale_shift=True)
    wrapped = [m for m in model.modules() if isinstance(m, ScaleShiftResnetBlock)]
    plain = [m for m in model.modules() if isinstance(m, DiffusionUNetResnetBlock)]
    assert len(wrapped) == len(plain) >= 4  # every block wrapped (down, middle x2, up)
    block = wrapped[0]
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.3)
        x, emb = torch.randn(2, block.block.norm1.num_channels, 6, 6), torch.randn(2, block.block.time_emb_proj.in_features)
        b = block.block
        scale, shift = b.time_emb_proj(torch.nn.functional.silu(emb)).chunk(2, dim=1)
        h = b.conv1(torch.nn.functional.silu(b.norm1(x)))
        h = b.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        expected = b.skip_connection(x) + b.conv2(torch.nn.functional.silu(h))
        torch.testing.assert_close(block(x, emb), expected)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.1)
    model.eval()
    inp = inputs()
    base = run(model, inp)
    assert (run(model, inp, flag=1 - inp["flag"]) - base).abs().max() > 1e-4
    cfg = load_config(None)["diffusion"]
    cfg = {**cfg, "unet": {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1,
                           "num_head_channels": 8, "norm_num_groups": 4, "clinical_hidden": 16}}
    save_diffusion(tmp_path / "model.pt", model, model_config(cfg, 1, "ice", C, scale_shift=True), {},
                   scheduler_config(cfg))
    torch.testing.assert_close(run(load_diffusion(tmp_path / "model.pt")[0], inp), base)
