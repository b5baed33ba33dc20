"""Batched DDIM sampler: seeds reproduce samples whatever the chunk size, guidance runs only the branches
it needs and scale 0 is the null-embedding model, η > 0 matches MONAI's step, chunk sizing, slice ranges.

Models are tiny random networks (MONAI U-Net / AutoencoderKL with 4-16 channels): the properties
tested are about the sampler's bookkeeping, not about what a trained model generates. The helpers
here (tiny models, a synthetic preprocessed patient) are reused by test_sampling_products and test_simulate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hemexp.diffusion.ddim import branches, combine, ddim_step, guided_v
from hemexp.diffusion.model import build_model, save_diffusion, scheduler_config
from hemexp.sampling.noise import draw, item_generators
from hemexp.sampling.sampler import (
    ModelBundle,
    SamplerSettings,
    auto_chunk_size,
    context_slices,
    generate_followups,
    sample_deltas,
    sampled_slices,
)
from hemexp.vae.model import MultiHeadVAE, VAEConfig

torch.set_num_threads(1)
LATENT_C = 2
SCHED = scheduler_config({"timesteps": 1000, "beta_schedule": "sigmoid", "prediction": "v_prediction"})
CLINICAL = {"onset_to_ct_h": 2.0, "baseline_iph_ml": 10.0, "anticoagulant": 1.0, "antiplatelet": 0.0, "age": 70.0,
            "gcs": 13.0, "sbp": 170.0}


def tiny_diffusion_config(conditioning: str = "ice", context: int = 1) -> dict:
    return {"latent_channels": LATENT_C, "context": context, "conditioning": conditioning, "channels": [8, 8],
            "attention_levels": [False, False], "num_res_blocks": 1, "num_head_channels": 8, "norm_num_groups": 4,
            "clinical_hidden": 8}


def tiny_diffusion(conditioning: str = "ice", context: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(tiny_diffusion_config(conditioning, context)).eval()
    with torch.no_grad():  # MONAI zero-initialises output convs (an untrained U-Net predicts 0): randomise
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.3)
        if model.uses_clinical:  # and make the null branch clearly differ from the clinical one
            model.unet.class_embedding.null_clinical.normal_(0, 1.0)
    return model


def tiny_vae(seed: int = 0) -> MultiHeadVAE:
    torch.manual_seed(seed)
    vae = MultiHeadVAE(VAEConfig(channels=(4, 8), num_res_blocks=1, latent_channels=LATENT_C, norm_num_groups=4)).eval()
    with torch.no_grad():  # no rare-foreground prior: a random decoder then sets a fair share of mask voxels
        for name in ("iph_logits", "ivh_logits"):
            vae.heads[name].bias.fill_(0.0)
    return vae


def tiny_bundle(conditioning: str = "ice", context: int = 1) -> ModelBundle:
    return ModelBundle(vae=tiny_vae(), diffusion=tiny_diffusion(conditioning, context),
                       info={"step_slices": 1, "context": context}, sched_cfg=SCHED,
                       stats={"mean": [0.1] * LATENT_C, "std": [0.9] * LATENT_C})


def save_tiny_models(models: Path, variants: dict[str, tuple[str, int]], results: Path | None = None) -> None:
    """``models/vae/vae.pt``, ``models/diffusion/{v}/model.pt`` and ``<results>/latents/stats.json``."""
    from hemexp.core.files import write_json

    tiny_vae().save(models / "vae" / "vae.pt")
    for name, (cond, ctx) in variants.items():
        model = tiny_diffusion(cond, ctx)
        save_diffusion(models / "diffusion" / name / "model.pt", model, tiny_diffusion_config(cond, ctx),
                       {"name": name, "context": ctx, "conditioning": cond, "latent_channels": LATENT_C,
                        "step_slices": 1}, SCHED)
    write_json((results or models.parent) / "latents" / "stats.json", {"mean": [0.1] * LATENT_C, "std": [0.9] * LATENT_C})


def synthetic_baseline(shape=(16, 16, 10), seed: int = 0) -> dict[str, np.ndarray]:
    """Model-grid baseline: brain disc ~30 HU, IPH ball in slices 4-6 (65 HU), a little IVH in slice 5."""
    rng = np.random.default_rng(seed)
    x, y, z = np.indices(shape)
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    brain = (x - cx) ** 2 + (y - cy) ** 2 < (0.45 * shape[0]) ** 2
    iph = ((x - cx - 2) ** 2 + (y - cy) ** 2 + 2.0 * (z - 5) ** 2 < 6).astype(np.uint8)
    ivh = ((x - cx + 3) ** 2 + (y - cy) ** 2 < 2) & (z == 5)
    ct = np.where(brain, 30.0 + rng.normal(0, 2, shape), 0.0)
    ct[iph > 0] = 65.0
    return {"ct": ct.astype(np.float32), "iph": iph, "ivh": ivh.astype(np.uint8)}


def write_patient_dir(pdir: Path, baseline: dict[str, np.ndarray], spacing=(3.0, 3.0, 3.0), angle_deg: float = 8.0,
                      native_mm=(2.0, 2.0, 2.5), followup: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """A preprocessed-patient folder: model-grid NIfTIs + transforms (a rigid bl_to_template.mat,
    model_grid.json, native_grid.json) as ``hemexp preprocess`` writes them. Returns the grid affine."""
    import ants

    from hemexp.io.nifti import make_image, save_nifti
    from hemexp.preprocess.grid import ModelGrid
    from hemexp.preprocess.register import BL_TO_TEMPLATE, MODEL_GRID, TRANSFORMS_DIR, save_native_grid

    shape = baseline["ct"].shape
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing)
    for key, data in baseline.items():
        save_nifti(make_image(data, affine), pdir / f"bl_{key}.nii.gz")
    for key, data in (followup or {}).items():
        save_nifti(make_image(data, affine), pdir / f"fu_{key}.nii.gz")
    tdir = pdir / TRANSFORMS_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    ModelGrid(affine, tuple(shape)).save(tdir / MODEL_GRID)
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=rot,
                                    translation=(2.0, -1.5, 1.0), center=(0.0, 0.0, 0.0))
    ants.write_transform(tx, str(tdir / BL_TO_TEMPLATE))
    extent = np.array(shape) * np.array(spacing)
    nshape = tuple(int(v) for v in np.ceil(extent * 1.3 / np.array(native_mm)))
    naff = np.diag([*native_mm, 1.0])
    naff[:3, 3] = -(np.array(nshape) - 1) / 2 * np.array(native_mm)
    save_native_grid(make_image(np.zeros(nshape, np.float32), naff), pdir)
    return affine


# ----------------------------------------------------------------------------- reproducibility


def _run(model, chunk, seed=3, eta=0.0, scale=1.0, flags=(1, 0, 1), slices=(4, 5, 6, 7), noise="independent"):
    baseline = torch.randn(len(slices), LATENT_C * model.context, 8, 8, generator=torch.Generator().manual_seed(1))
    clinical = torch.rand(7, generator=torch.Generator().manual_seed(2))
    settings = SamplerSettings(steps=4, eta=eta, guidance_scale=scale, seed=seed, chunk_size=chunk, slice_noise=noise)
    return sample_deltas(model, SCHED, baseline, clinical, list(flags), settings, slice_ids=list(slices),
                         slice_spacing_mm=3.0)


@pytest.mark.parametrize("noise", ["independent", "shared", "correlated"])
@pytest.mark.parametrize("eta,scale", [(0.0, 1.0), (0.7, 2.0)])
def test_same_seed_same_samples_whatever_the_chunk_size(eta, scale, noise):
    model = tiny_diffusion()
    ref, info = _run(model, chunk=100, eta=eta, scale=scale, noise=noise)
    assert ref.shape == (3, 4, LATENT_C, 8, 8) and info["unet_calls"] == 4
    assert torch.equal(_run(model, chunk=100, eta=eta, scale=scale, noise=noise)[0], ref)  # a rerun is bit-identical
    for chunk in (1, 2, 5):
        out, info = _run(model, chunk=chunk, eta=eta, scale=scale, noise=noise)
        # same noise per item; only the U-Net's batch-size-dependent float kernels (oneDNN/MKL pick
        # different blockings, ~1e-6 per call) can differ across chunk sizes
        assert torch.allclose(out, ref, rtol=0, atol=1e-4), f"chunk {chunk} changed the samples"
    assert info["unet_calls"] == 4 * int(np.ceil(12 / (5 // (2 if scale != 1 else 1))))
    assert (_run(model, chunk=100, seed=4, eta=eta, scale=scale, noise=noise)[0] - ref).abs().max() > 0.1


def test_sample_noise_is_keyed_by_sample_and_slice_not_batch_composition():
    model = tiny_diffusion()
    full, _ = _run(model, chunk=7, flags=(1, 0, 1), slices=(4, 5, 6, 7))
    sub, _ = _run(model, chunk=7, flags=(1,), slices=(5, 6))
    # sample 0's slices 5 and 6 are the same whether drawn alone or with others (flag 1 in both runs);
    # the baselines differ per position, so compare the noise itself instead of the outputs
    gens_full, gens_sub = item_generators(3, [0, 1, 2], [4, 5, 6, 7]), item_generators(3, [0], [5, 6])
    assert torch.equal(draw(gens_full, (2, 8, 8))[1:3], draw(gens_sub, (2, 8, 8)))
    assert full.shape[:2] == (3, 4) and sub.shape[:2] == (1, 2)


# ----------------------------------------------------------------------------- guidance


def _reference_loop(model, baseline, clinical, flags, seed, slices, drop: bool, steps=4):
    """One-item-at-a-time DDIM with a fixed clinical branch (null when ``drop``), same noise keys."""
    from hemexp.diffusion.model import ddim_scheduler

    sched = ddim_scheduler(SCHED, steps)
    out = torch.empty(len(flags), len(slices), LATENT_C, 8, 8)
    for k, flag in enumerate(flags):
        for j, z in enumerate(slices):
            x = draw(item_generators(seed, [k], [z]), (LATENT_C, 8, 8))
            for t in sched.timesteps:
                v = model(x, torch.tensor([int(t)]), baseline[j:j + 1], clinical[None], torch.tensor([flag]),
                          torch.tensor([drop]))
                x = sched.step(v, int(t), x)[0]
            out[k, j] = x[0]
    return out


@pytest.mark.parametrize("scale,drop", [(0.0, True), (1.0, False)])
def test_guidance_zero_is_the_null_embedding_model_and_one_the_conditional(scale, drop):
    model = tiny_diffusion()
    slices = (4, 5)
    baseline = torch.randn(2, LATENT_C, 8, 8, generator=torch.Generator().manual_seed(1))
    clinical = torch.rand(7, generator=torch.Generator().manual_seed(2))
    settings = SamplerSettings(steps=4, guidance_scale=scale, seed=3, chunk_size=3, slice_noise="independent")
    with torch.no_grad():
        out, info = sample_deltas(model, SCHED, baseline, clinical, [1, 0], settings, slice_ids=list(slices))
        ref = _reference_loop(model, baseline, clinical, [1, 0], 3, slices, drop)
        other = _reference_loop(model, baseline, clinical, [1, 0], 3, slices, not drop)
    assert info["branches"] == (["null"] if drop else ["cond"])
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, other, atol=1e-3)  # the two branches really differ


def test_guided_v_combines_branches_and_counts_rows():
    model = tiny_diffusion()
    x, base = torch.randn(3, LATENT_C, 8, 8), torch.randn(3, LATENT_C, 8, 8)
    t, clin, flag = torch.full((3,), 500), torch.rand(3, 7), torch.tensor([0, 1, 1])
    rows = []
    model.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
    with torch.no_grad():
        v = guided_v(model, x, t, base, clin, flag, 2.5, ("cond", "null"))
        cond = model(x, t, base, clin, flag, torch.zeros(3, dtype=torch.bool))
        null = model(x, t, base, clin, flag, torch.ones(3, dtype=torch.bool))
    assert rows[0] == 6  # both branches in one batched call
    assert torch.allclose(v, null + 2.5 * (cond - null), atol=1e-5)
    assert branches(model, 1.0) == ("cond",) and branches(model, 0.0) == ("null",)
    assert branches(model, 3.0) == ("cond", "null")
    assert branches(tiny_diffusion("i"), 3.0) == ("cond",)  # no clinical branch: nothing to guide


def test_projected_guidance_drops_the_update_part_along_the_conditional_prediction():
    """The reference code's rule: v_cond + (s − 1)(u⊥ + k u∥), u = v_cond − v_null split per item."""
    g = torch.Generator().manual_seed(3)
    cond, null = torch.randn(4, 2, 5, 5, generator=g), torch.randn(4, 2, 5, 5, generator=g)
    s = 2.5
    v = combine(cond, null, s, "projected")
    step = (v - cond) / (s - 1.0)  # = u⊥: orthogonal to v_cond, item by item
    assert torch.allclose((step * cond).flatten(1).sum(1), torch.zeros(4), atol=1e-4)
    u = cond - null
    par = (u * cond).flatten(1).sum(1).view(-1, 1, 1, 1) / cond.flatten(1).pow(2).sum(1).view(-1, 1, 1, 1) * cond
    assert torch.allclose(step, u - par, atol=1e-5)
    assert torch.allclose(combine(cond, null, s, "projected", keep_parallel=1.0), combine(cond, null, s), atol=1e-5)
    assert torch.allclose(combine(cond, null, 1.0, "projected"), cond)
    model = tiny_diffusion()
    assert branches(model, 0.0, "projected") == ("cond", "null")  # its update starts from v_cond
    assert branches(model, 1.0, "projected") == ("cond",)
    with pytest.raises(ValueError, match="unknown guidance rule"):
        combine(cond, null, s, "apg")


def test_no_null_branch_compute_at_scale_one_or_without_clinical_branch():
    for model, scale, per_item in ((tiny_diffusion(), 1.0, 1), (tiny_diffusion("i"), 2.0, 1), (tiny_diffusion(), 2.0, 2)):
        rows = []
        model.register_forward_pre_hook(lambda _m, a, rows=rows: rows.append(a[0].shape[0]))
        _run(model, chunk=100, scale=scale)
        assert sum(rows) == 4 * 12 * per_item  # steps x items x branches


def test_eta_step_equals_monai_step_with_the_same_noise():
    from hemexp.diffusion.model import ddim_scheduler

    sched = ddim_scheduler(SCHED, 10)
    x, v = torch.randn(2, LATENT_C, 8, 8), torch.randn(2, LATENT_C, 8, 8)
    t = int(sched.timesteps[3])
    monai = sched.step(v, t, x, eta=0.6, generator=torch.Generator().manual_seed(9))[0]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(ddim_step(sched, v, t, x, 0.6, noise), monai, atol=1e-5)
    assert torch.equal(ddim_step(sched, v, t, x, 0.0), sched.step(v, t, x)[0])


# ----------------------------------------------------------------------------- chunking and slices


def test_auto_chunk_size_follows_free_memory(monkeypatch):
    import hemexp.sampling.sampler as smp

    model = tiny_diffusion()
    measured = smp.row_bytes(model, (LATENT_C, 8, 8), torch.device("cpu"))
    assert measured > LATENT_C * 8 * 8 * 4  # at least the output of one row
    monkeypatch.setattr(smp, "row_bytes", lambda *a, **k: 1000)
    monkeypatch.setattr(smp, "free_bytes", lambda device: 100_000)
    assert auto_chunk_size(model, (LATENT_C, 8, 8), torch.device("cpu"), memory_fraction=0.5) == 50
    assert auto_chunk_size(model, (LATENT_C, 8, 8), torch.device("cpu"), memory_fraction=0.5, max_rows=7) == 7
    monkeypatch.setattr(smp, "free_bytes", lambda device: 10)
    assert auto_chunk_size(model, (LATENT_C, 8, 8), torch.device("cpu")) == 1


def test_sampled_slices_use_baseline_extent_plus_margin():
    iph = np.zeros((4, 4, 20), np.uint8)
    iph[1, 1, [7, 9]] = 1
    assert sampled_slices(iph, spacing_z=3.0, margin_mm=6.0).tolist() == list(range(5, 12))
    assert sampled_slices(iph, 3.0, 5.9).tolist() == list(range(6, 11))
    assert sampled_slices(iph, 3.0, 100.0).tolist() == list(range(20))
    with pytest.raises(ValueError):
        sampled_slices(np.zeros((2, 2, 3)), 3.0, 6.0)
    ctx = context_slices(np.array([0, 5, 9]), context=3, step=2, nz=10)
    assert ctx.tolist() == [[0, 0, 2], [3, 5, 7], [7, 9, 9]]


def test_generate_followups_shapes_masks_and_window():
    base = synthetic_baseline()
    fs = generate_followups(tiny_bundle(context=3), base, 3.0, np.full(7, 0.5, np.float32), [1, 0],
                            SamplerSettings(steps=2, chunk_size=4), z_margin_mm=3.0, mask_threshold=0.5,
                            hu_window=(0, 100))
    assert fs.zs.tolist() == [3, 4, 5, 6, 7]
    assert fs.ct_hu.shape == (2, 5, 16, 16) and fs.iph.shape == fs.ivh.shape == fs.ct_hu.shape
    assert fs.ct_hu.min() >= 0.0 and fs.ct_hu.max() <= 100.0
    assert set(np.unique(fs.iph)) <= {0, 1} and fs.iph.dtype == np.uint8
    assert fs.info["timings_s"]["sample_s"] > 0 and fs.info["chunk_rows"] == 4


def test_settings_from_config_and_overrides():
    from hemexp.core.config import load_config

    cfg = load_config()
    s = SamplerSettings.from_config(cfg["sampling"], steps=7, seed=None)
    assert s.steps == 7 and s.seed == cfg["sampling"]["seed"] and s.guidance_scale == cfg["sampling"]["guidance_scale"]


def test_load_bundle_roundtrip(tmp_path):
    from hemexp.sampling.sampler import load_bundle

    save_tiny_models(tmp_path / "models", {"2D-ice": ("ice", 1)})
    b = load_bundle(tmp_path / "models/vae/vae.pt", tmp_path / "models/diffusion/2D-ice/model.pt",
                    tmp_path / "latents/stats.json", "cpu")
    assert b.diffusion.uses_flag and b.step_slices == 1 and b.vae.latent_channels == LATENT_C
