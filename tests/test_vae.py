"""Multi-head VAE: shapes and save/load, loss terms, the offline perceptual term, fidelity metrics."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hemexp.vae.fidelity import fidelity_table, slice_metrics, to_markdown
from hemexp.vae.figures import reconstruction_figure
from hemexp.vae.losses import (
    LocalPerceptualLoss,
    LossWeights,
    VAELoss,
    build_discriminator,
    kl_loss,
    warmup_weight,
)
from hemexp.vae.model import MultiHeadVAE, VAEConfig, load_vae, reconstruct

torch.set_num_threads(1)
TINY = VAEConfig(channels=(8, 16, 16), num_res_blocks=1, latent_channels=4, norm_num_groups=4)


def discs(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size]: CT (brain ellipse + brighter hematoma disc), IPH = the disc, IVH in odd items."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((n, 3, size, size), np.float32)
    for i in range(n):
        brain = ((xx - 0.5) / 0.38) ** 2 + ((yy - 0.5) / 0.45) ** 2 < 1
        cx, cy, r = rng.uniform(0.35, 0.65, 2).tolist() + [rng.uniform(0.1, 0.18)]
        iph = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) & brain
        ivh = (((xx - 0.5) ** 2 + (yy - 0.25) ** 2) < 0.07**2) & ~iph if i % 2 else np.zeros_like(iph)
        ct = np.where(brain, 0.35, 0.0)
        ct = np.where(iph, 0.75, np.where(ivh, 0.65, ct))
        out[i] = [ct, iph, ivh]
    return torch.from_numpy(out)


def weights(**kw) -> LossWeights:
    base = dict(ct="l2", ct_weight=1.0, seg_weight=0.5, iph_weight=1.0, ivh_weight=2.0, kl_weight=1e-8,
                adv_weight=5e-3, adv_warmup_steps=10, disc_lr=1e-4, disc_channels=8, disc_layers=2,
                perceptual_weight=1e-3, perceptual_warmup_steps=5, perceptual_weights=None)
    return LossWeights(**{**base, **kw})


# ------------------------------------------------------------------------------------------ model
def test_shapes_heads_and_latent_factor():
    torch.manual_seed(0)
    model = MultiHeadVAE(TINY)
    x = discs(2)
    out, mu, sigma = model(x)
    assert set(out) == {"ct", "iph_logits", "ivh_logits"}
    assert all(v.shape == (2, 1, 32, 32) for v in out.values())
    assert mu.shape == sigma.shape == (2, 4, 8, 8) and model.downsample_factor == 4
    assert (sigma > 0).all()
    assert model.encode_mean(x).shape == (2, 4, 8, 8)
    probs = model.decode_probs(mu)
    assert probs["ct"].min() >= 0 and probs["ct"].max() <= 1 and probs["iph"].shape == (2, 1, 32, 32)
    # the three heads are separate modules on shared decoder features
    assert not torch.equal(out["iph_logits"], out["ivh_logits"])


def test_sampling_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    model = MultiHeadVAE(TINY)
    mu, sigma = model.encode(discs(2))
    a = model.sample(mu, sigma, torch.Generator().manual_seed(3))
    b = model.sample(mu, sigma, torch.Generator().manual_seed(3))
    c = model.sample(mu, sigma, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = MultiHeadVAE(TINY).eval()
    model.save(tmp_path / "vae.pt")
    loaded = load_vae(tmp_path / "vae.pt")
    x = discs(2)
    assert loaded.config == model.config and not loaded.training
    for k, v in model.decode(model.encode_mean(x)).items():
        assert torch.allclose(v, loaded.decode(loaded.encode_mean(x))[k])
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a HemExp VAE"):
        load_vae(tmp_path / "other.pt")


# ----------------------------------------------------------------------------------------- losses
def test_warmup_and_kl():
    assert warmup_weight(0.5, 9, 10) == 0.0 and warmup_weight(0.5, 10, 10) == 0.5
    mu = torch.zeros(2, 4, 3, 3)
    assert kl_loss(mu, torch.ones_like(mu)).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_loss(mu + 1, torch.ones_like(mu)).item() == pytest.approx(0.5 * 36)


def test_generator_terms_follow_warmups():
    torch.manual_seed(0)
    model, disc = MultiHeadVAE(TINY), build_discriminator(8, 2)
    loss = VAELoss(weights())
    x = discs(2)
    out, mu, sigma = model(x)
    early = loss.generator(x, out, mu, sigma, step=0, discriminator=disc)
    late = loss.generator(x, out, mu, sigma, step=10, discriminator=disc)
    assert "adv" not in early and "adv" in late and late["adv"] > 0
    assert late["total"] > early["total"]
    d = loss.discriminator(x[:, :1], out["ct"], disc)
    assert d.ndim == 0 and d > 0


def test_ct_loss_choice_and_segmentation_weights():
    x = discs(2)
    perfect = {"ct": x[:, :1].clone(), "iph_logits": (x[:, 1:2] * 2 - 1) * 20, "ivh_logits": (x[:, 2:3] * 2 - 1) * 20}
    mu, sigma = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    for kind in ("l1", "l2"):
        t = VAELoss(weights(ct=kind)).generator(x, perfect, mu, sigma, step=0)
        assert t["ct"].item() == pytest.approx(0.0, abs=1e-7) and t["iph"].item() < 1e-3
    bad = {**perfect, "ivh_logits": -perfect["ivh_logits"]}
    light = VAELoss(weights(ivh_weight=1.0)).generator(x, bad, mu, sigma, step=0)["total"]
    heavy = VAELoss(weights(ivh_weight=2.0)).generator(x, bad, mu, sigma, step=0)["total"]
    assert heavy > light  # the IVH head weight scales its term


# ------------------------------------------------------------------------------------- perceptual
def _resnet_weights(tmp_path, spatial_dims: int = 2, bare: bool = False):
    from monai.networks.nets import resnet10

    torch.manual_seed(0)
    net = resnet10(spatial_dims=spatial_dims, n_input_channels=1, num_classes=2)
    path = tmp_path / f"feat{spatial_dims}.pt"
    payload = net.state_dict() if bare else {"arch": "resnet10", "state_dict": net.state_dict(),
                                             "layers": ["layer1", "layer2"]}
    torch.save(payload, path)
    return path


def test_perceptual_off_without_weights_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="hemexp.vae.losses"):
        loss = VAELoss(weights(perceptual_weights=None))
    assert loss.perceptual is None
    lines = [r.getMessage() for r in caplog.records if "perceptual" in r.getMessage()]
    assert len(lines) == 1 and "off" in lines[0]
    x = discs(2)
    out = {"ct": x[:, :1], "iph_logits": x[:, 1:2], "ivh_logits": x[:, 2:3]}
    assert "perceptual" not in loss.generator(x, out, torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8), step=100)


def test_perceptual_on_with_local_weights(tmp_path, caplog):
    path = _resnet_weights(tmp_path)
    with caplog.at_level(logging.INFO, logger="hemexp.vae.losses"):
        loss = VAELoss(weights(perceptual_weights=str(path)))
    assert isinstance(loss.perceptual, LocalPerceptualLoss)
    assert any("perceptual loss on" in r.getMessage() for r in caplog.records)
    x = discs(2)
    same = loss.perceptual(x[:, :1], x[:, :1].clone())
    diff = loss.perceptual(x[:, :1], torch.flip(x[:, :1], dims=[-1]) * 0.5)
    assert same.item() == pytest.approx(0.0, abs=1e-6) and diff.item() > 1e-3
    pred = x[:, :1].clone().requires_grad_(True)
    out = {"ct": pred, "iph_logits": x[:, 1:2], "ivh_logits": x[:, 2:3]}
    mu, sigma = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    assert "perceptual" not in loss.generator(x, out, mu, sigma, step=4)  # before its warm-up
    terms = loss.generator(x, {**out, "ct": pred * 0.9}, mu, sigma, step=5)
    terms["total"].backward()
    assert terms["perceptual"] > 0 and pred.grad is not None
    assert not any(p.requires_grad for p in loss.perceptual.parameters())  # frozen feature network


def test_perceptual_accepts_bare_3d_state_dict(tmp_path):
    loss = LocalPerceptualLoss(_resnet_weights(tmp_path, spatial_dims=3, bare=True))
    x = discs(2)
    assert loss(x[:, :1], x[:, :1] * 0.5).item() > 0


def test_perceptual_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="perceptual_weights"):
        VAELoss(weights(perceptual_weights=str(tmp_path / "nope.pt")))


# ---------------------------------------------------------------------------------------- metrics
def test_metrics_perfect_reconstruction_is_one_and_corruption_drops():
    x = discs(4)
    perfect = slice_metrics(x, x.clone())
    for key in ("ct_ssim", "iph_dice", "ivh_dice"):
        assert np.allclose(perfect[key], 1.0, atol=1e-5), key
    noisy = x.clone()
    noisy[:, 0] = (noisy[:, 0] + 0.3 * torch.randn(noisy[:, 0].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    noisy[:, 1] = torch.roll(noisy[:, 1], shifts=4, dims=-1)
    corrupted = slice_metrics(x, noisy)
    assert corrupted["ct_ssim"].mean() < 0.6
    assert corrupted["iph_dice"].mean() < 0.8
    assert np.allclose(corrupted["ivh_dice"], 1.0)  # untouched channel


def test_empty_mask_convention():
    x = discs(2)  # item 0 has no IVH, item 1 has IVH
    recon = x.clone()
    m = slice_metrics(x, recon)
    assert m["ivh_empty"].tolist() == [1.0, 0.0] and m["ivh_dice"].tolist() == pytest.approx([1.0, 1.0])
    recon[0, 2, 5:8, 5:8] = 1.0  # hallucinated IVH where the reference has none
    recon[1, 2] = 0.0  # missed IVH
    m = slice_metrics(x, recon)
    assert m["ivh_dice"].tolist() == pytest.approx([0.0, 0.0])


def test_fidelity_markdown_bytes_unchanged_by_the_shared_table_writer():
    """vae_fidelity.md is laid out by hemexp.core.tables now; the bytes are those of the old hand-written table."""
    results = {s: {"CT SSIM": 0.91234, "IPH Dice": 0.8, "IVH Dice": 0.70051, "n_slices": 3 + i}
               for i, s in enumerate(("Train", "Test"))}
    md = to_markdown(fidelity_table(results), results)
    assert md.startswith("| split | CT SSIM | IPH Dice | IVH Dice | slices |\n|---|---|---|---|---|\n"
                         "| Train | 0.912 | 0.800 | 0.701 | 3 |\n| Test | 0.912 | 0.800 | 0.701 | 4 |\n\nDice per slice;")
    assert md.endswith("(MONAI DiceMetric(ignore_empty=False)).\n\nPaper (train/test): CT SSIM 0.931/0.914 / "
                       "IPH Dice 0.986/0.986 / IVH Dice 0.943/0.974.\n")


def test_reconstruct_table_markdown_and_figure(tmp_path):
    torch.manual_seed(0)
    model = MultiHeadVAE(TINY).eval()
    x = discs(3)
    recon = reconstruct(model, x)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    results = {s: {"CT SSIM": 0.9, "IPH Dice": 0.8, "IVH Dice": 0.7, "n_slices": 3} for s in ("Train", "Test")}
    table = fidelity_table(results)
    assert list(table.index) == ["Train", "Test"] and list(table.columns) == ["CT SSIM", "IPH Dice", "IVH Dice"]
    assert "| Train | 0.900 | 0.800 | 0.700 | 3 |" in to_markdown(table, results)
    path = reconstruction_figure(x, recon, tmp_path / "fig.png", title="t")
    assert path.stat().st_size > 1000
