"""Diffusion training: latent items, balanced step-indexed batches, overfitting, exact resume, and the
``train-diffusion`` entry point end to end (tiny models, CPU, seconds)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from test_latents import as_arrays, fake_latents, tiny_vae

from hemexp.core.config import load_config
from hemexp.core.files import write_json
from hemexp.core.layout import Layout
from hemexp.diffusion.latents import (
    PatientLatents,
    compute_stats,
    normalise,
    save_latents,
)
from hemexp.diffusion.model import load_diffusion, model_config, scheduler_config
from hemexp.diffusion.train import (
    BalancedStepBatchSampler,
    DiffusionModule,
    LatentPairs,
    fit_diffusion,
    grid_items,
)

torch.set_num_threads(1)
UNET = {"channels": [16, 32], "attention_levels": [False, False], "num_res_blocks": 1, "num_head_channels": 8,
        "norm_num_groups": 8, "clinical_hidden": 16}
QUIET = {"enable_progress_bar": False}


def structured(i: int, flag: int) -> PatientLatents:
    """Random baselines; the follow-up adds a fixed blob to channel 0 when the patient expands, so the
    target Δz is a learnable function of the conditions (a model can fit it almost exactly)."""
    lat = fake_latents(f"T{i}", "train", flag=flag, seed=i)
    yy, xx = np.mgrid[:4, :4]
    blob = np.exp(-((yy - 1.5) ** 2 + (xx - 2) ** 2) / 2).astype(np.float32)
    fu, fu_flip = lat.z_bl.copy(), lat.z_bl_flip.copy()
    fu[:, 0] += 3 * flag * blob
    fu_flip[:, 0] += 3 * flag * blob[:, ::-1]
    return dataclasses.replace(lat, z_fu=fu, z_fu_flip=fu_flip)


def diffusion_cfg(**changes) -> dict:
    cfg = {**load_config(None)["diffusion"], "unet": UNET, "batch_size": 4, "accumulate": 1, "max_steps": 6,
           "checkpoint_every": 3, "lr": 3e-3}
    return {**cfg, **changes}


def module_for(cfg: dict, context: int = 1, conditioning: str = "ice") -> DiffusionModule:
    pl.seed_everything(0, verbose=False)
    return DiffusionModule(model_config(cfg, context, conditioning, 4), scheduler_config(cfg), cfg, seed=0)


def test_latent_pairs_items_are_normalised_progressions_with_context_in_z_order():
    lats = [structured(0, 1), structured(1, 0)]
    stats = compute_stats(lats)
    ds = LatentPairs(lats, stats, context=3, step_slices=2)
    assert len(ds) == 8 and ds.flags.tolist() == [1] * 4 + [0] * 4
    item = ds[1]  # patient 0, second target row (row 2, z = 12): context rows z 10, 12, 14
    bl, fu = normalise(lats[0].z_bl, stats), normalise(lats[0].z_fu, stats)
    torch.testing.assert_close(item["delta"], torch.from_numpy(fu[2] - bl[2]))
    torch.testing.assert_close(item["baseline"], torch.from_numpy(np.concatenate([bl[0], bl[2], bl[4]])))
    assert item["baseline"].shape == (12, 4, 4) and int(item["flag"]) == 1
    assert torch.count_nonzero(ds[5]["delta"]) == 0  # non-expander: no progression
    assert "delta_flip" not in item
    flipped = LatentPairs(lats, stats, context=3, step_slices=2, flips=True)[1]
    bl_f, fu_f = normalise(lats[0].z_bl_flip, stats), normalise(lats[0].z_fu_flip, stats)
    torch.testing.assert_close(flipped["delta_flip"], torch.from_numpy(fu_f[2] - bl_f[2]))
    torch.testing.assert_close(flipped["baseline_flip"], torch.from_numpy(np.concatenate([bl_f[0], bl_f[2], bl_f[4]])))


def test_flip_draws_select_the_mirrored_encodings():
    lats = [structured(0, 1), structured(1, 0)]
    for lat in lats:  # make the mirrored encodings unrelated to the stored ones: selection must be explicit
        lat.z_bl_flip[:] = np.random.default_rng(7).normal(size=lat.z_bl_flip.shape)
    ds = LatentPairs(lats, compute_stats(lats), context=1, step_slices=1, flips=True)
    module = module_for(diffusion_cfg())
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    draws = module.draws(4, (4, 4, 4, 4), step=0, micro=0)
    mirrored = {**batch, "delta": batch["delta_flip"], "baseline": batch["baseline_flip"]}
    with torch.no_grad():
        all_flipped = module.loss(batch, {**draws, "flip": torch.ones(4, dtype=torch.bool)})[1]
        as_mirrored = module.loss(mirrored, {**draws, "flip": torch.zeros(4, dtype=torch.bool)})[1]
        unflipped = module.loss(batch, {**draws, "flip": torch.zeros(4, dtype=torch.bool)})[1]
    torch.testing.assert_close(all_flipped, as_mirrored)
    assert not torch.allclose(all_flipped, unflipped)


def test_balanced_sampler_yields_both_classes_equally_and_is_step_indexed():
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 1, 0, 0])  # 20 % expansion
    start = {"b": 0}
    sampler = BalancedStepBatchSampler(labels, batch_size=6, seed=3, total_batches=40,
                                       start_batch=lambda: start["b"])
    batches = list(sampler)
    assert len(batches) == 40
    for batch in batches:
        assert sorted(labels[batch].tolist()) == [0, 0, 0, 1, 1, 1]
    seen = {i for b in batches for i in b}
    assert seen == set(range(10))  # the minority class is cycled, every item is used
    start["b"] = 17  # a resumed run continues with exactly the batches an uninterrupted one sees
    assert list(sampler) == batches[17:]
    ranks = [BalancedStepBatchSampler(labels, 6, 3, 40, rank=lambda r=r: r, world_size=lambda: 2).batch(5)
             for r in (0, 1)]
    assert ranks[0] != ranks[1]  # DDP ranks draw different items
    with pytest.raises(ValueError, match="both classes"):
        BalancedStepBatchSampler(np.zeros(5), 4, 0, 10)


def test_grid_items_pick_both_classes_with_the_largest_change():
    flags = np.array([0, 0, 1, 0, 1, 0, 1])
    change = np.array([0.1, 3.0, 0.5, 2.0, 4.0, 0.0, 1.0])
    assert grid_items(flags, change, 4) == [4, 6, 1, 3]
    assert grid_items(np.zeros(3, int), np.arange(3.0), 4) == [2, 1]  # one class only: what there is


def test_tiny_model_overfits_a_handful_of_slices(tmp_path):
    lats = [structured(0, 1), structured(1, 0)]
    ds = LatentPairs(lats, compute_stats(lats), context=1, step_slices=1)
    cfg = diffusion_cfg(batch_size=8, max_steps=150, checkpoint_every=1000, ema_decay=0.9, clinical_dropout=0.0)
    module = module_for(cfg)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ds[0]}

    def held_out_loss() -> float:  # fixed timesteps/noise, never used in training (step 10**6)
        with torch.no_grad():
            return float(np.mean([module.loss(batch, module.draws(8, (8, 4, 4, 4), 10**6, m))[0] for m in range(4)]))

    before = held_out_loss()
    fit_diffusion(module, ds, cfg, tmp_path, "fp", resume=False, trainer_overrides=QUIET)
    after = held_out_loss()
    assert after < before / 4, (before, after)


class LiveWeights(pl.Callback):
    """Records the live (non-averaged) weights after every optimizer step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def test_trained_module_holds_the_ema_of_the_live_weights(tmp_path):
    lats = [structured(0, 1), structured(1, 0)]
    ds = LatentPairs(lats, compute_stats(lats), context=1, step_slices=1)
    cfg = diffusion_cfg(max_steps=5, ema_decay=0.6)
    module, live = module_for(cfg), LiveWeights()
    fit_diffusion(module, ds, cfg, tmp_path, "fp", trainer_overrides=QUIET, extra_callbacks=(live,))
    assert len(live.steps) == 5
    for name, value in module.model.state_dict().items():
        if not value.is_floating_point():
            continue
        ema = live.steps[0][name]  # the first update copies, then ema = d * ema + (1 - d) * w
        for weights in live.steps[1:]:
            ema = 0.6 * ema + 0.4 * weights[name]
        torch.testing.assert_close(value, ema, atol=1e-6, rtol=1e-5)
    name = "unet.conv_in.conv.weight"
    assert not torch.allclose(module.model.state_dict()[name], live.steps[-1][name])


class KillAt(pl.Callback):
    """Simulates a killed job: raises once ``global_step`` reaches ``step`` (after its checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError("killed")


def test_resume_reproduces_the_next_steps_exactly(tmp_path):
    lats = [structured(0, 1), structured(1, 0), structured(2, 1)]
    ds = LatentPairs(lats, compute_stats(lats), context=3, step_slices=1)
    cfg = diffusion_cfg(accumulate=2, max_steps=6, checkpoint_every=3)
    full = module_for(cfg, context=3)
    fit_diffusion(full, ds, cfg, tmp_path / "full", "fp", trainer_overrides=QUIET)
    assert len(full.history) == 12  # 6 steps x 2 micro-batches

    killed = module_for(cfg, context=3)
    with pytest.raises(RuntimeError, match="killed"):
        fit_diffusion(killed, ds, cfg, tmp_path / "killed", "fp", trainer_overrides=QUIET, extra_callbacks=(KillAt(3),))
    assert (tmp_path / "killed" / "last.ckpt").exists()
    resumed = module_for(cfg, context=3)
    fit_diffusion(resumed, ds, cfg, tmp_path / "killed", "fp", resume=True, trainer_overrides=QUIET)
    assert resumed.history == pytest.approx(full.history[6:], rel=1e-6, abs=1e-7)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # the EMA weights too

    rerun = module_for(cfg, context=3)  # a finished run resumes at its end and yields the same EMA weights
    fit_diffusion(rerun, ds, cfg, tmp_path / "full", "fp", trainer_overrides=QUIET)
    assert rerun.history == []
    for a, b in zip(full.model.state_dict().values(), rerun.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="different training setup"):
        fit_diffusion(module_for(cfg, context=3), ds, cfg, tmp_path / "full", "other", resume=True, trainer_overrides=QUIET)


def _cohort(tmp_path: Path, **diffusion) -> tuple[dict, Path]:
    """A config whose synthetic cohort is A001-A004 (train) + D001 (test), with cached latents."""
    cfg = load_config(None)
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["cohort"]["synthetic"]["sites"] = {"A": 4, "D": 1}
    cfg["diffusion"].update({"unet": UNET, "batch_size": 4, "max_steps": 4, "checkpoint_every": 2, **diffusion})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    lats = [dataclasses.replace(structured(i, i % 2), patient_id=f"A00{i + 1}") for i in range(4)]
    test = dataclasses.replace(fake_latents("D001", "test", offset=50.0), patient_id="D001")
    for lat in [*lats, test]:
        save_latents(Layout.of(cfg).latents(lat.patient_id), as_arrays(lat))
    write_json(Layout.of(cfg).latent_stats, compute_stats(lats))
    tiny_vae().save(Layout.of(cfg).vae_model)
    return cfg, path


@pytest.mark.slow
def test_train_diffusion_command_writes_model_grid_summary_and_mlflow_run(tmp_path):
    import mlflow

    from hemexp.cli import main
    from hemexp.tracking.runs import tracking_uri

    cfg, path = _cohort(tmp_path)
    assert main(["train-diffusion", "2.5D3-ice", "--config", str(path)]) == 0
    run_dir = Path(cfg["results_dir"]) / "models" / "diffusion" / "2.5D3-ice"
    model, info, sched = load_diffusion(run_dir / "model.pt")
    assert (info["name"], info["context"], info["conditioning"], info["step_slices"]) == ("2.5D3-ice", 3, "ice", 2)
    assert model.context == 3 and sched["schedule"] == "sigmoid_beta"
    assert (run_dir / "sample_grid.png").stat().st_size > 1000
    summary = yaml.safe_load((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["n_patients"] == 4 and summary["n_items"] == 16
    mlflow.set_tracking_uri(tracking_uri(cfg))
    run = mlflow.get_run((run_dir / "mlflow_run_id.txt").read_text().strip())
    assert run.data.tags["variant"] == "2.5D3-ice" and "final_loss" in run.data.metrics
    assert main(["train-diffusion", "nope", "--config", str(path)]) == 2

    frozen = {**cfg, "freeze_models": True}
    path.write_text(yaml.safe_dump(frozen))
    before = (run_dir / "model.pt").stat().st_mtime_ns
    assert main(["train-diffusion", "2.5D3-ice", "--config", str(path)]) == 0
    assert (run_dir / "model.pt").stat().st_mtime_ns == before  # frozen: kept, not retrained
