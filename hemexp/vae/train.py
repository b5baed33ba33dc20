"""Training of the multi-head VAE with Lightning: module, data module, and the ``train-vae`` entry point.

Manual optimisation, because a VAE-GAN has two optimisers (generator Adam with a cosine schedule,
discriminator Adam at ``disc_lr``) and the paper accumulates gradients (batch 4 x 16):

* each micro-batch back-propagates ``loss / accumulate`` for the generator (discriminator frozen via
  ``toggled_optimizer``) and, once the adversarial term is on, for the discriminator on the detached
  reconstruction; every ``accumulate``-th micro-batch both optimisers step;
* only the generator step counts as a Lightning step (``global_step``): the discriminator is stepped
  through the strategy's precision-aware ``optimizer_step``, so ``max_steps``, checkpoint intervals,
  warm-ups, the LR schedule and the progressive-resolution schedule all count generator steps;
* resolution, augmentation and posterior noise depend only on (seed, step, micro-batch, rank)
  (:func:`hemexp.engine.trainer.step_generator`) and data order only on the step
  (:class:`~hemexp.engine.trainer.StepIndexedBatchSampler`), which makes resume after a kill exact.

Augmentation is a small random affine per slice, applied through MONAI's batched ``AffineTransform``
(bilinear for CT, nearest for masks, so masks stay binary).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from monai.networks.layers import AffineTransform
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from hemexp.cohort.patients import patients
from hemexp.core.layout import Layout
from hemexp.engine import trainer as common
from hemexp.tracking.runs import RUN_ID_FILE, start_run
from hemexp.vae.data import SliceDataset
from hemexp.vae.figures import reconstruction_figure
from hemexp.vae.losses import LossWeights, VAELoss, build_discriminator
from hemexp.vae.model import MultiHeadVAE, VAEConfig, reconstruct

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 2 * 1024**3  # slices are kept in memory when they fit in this


# ------------------------------------------------------------------------------------------- data
class VAESlices(Dataset):
    """Both time points of every target row as separate VAE samples: item ``2i`` is row i's baseline
    centre slice, ``2i + 1`` its follow-up; each a float32 [3, H, W] (CT in [0, 1], IPH, IVH).

    ``cache=None`` keeps all slices in memory when they fit in :data:`CACHE_LIMIT_BYTES`."""

    def __init__(self, rows: Dataset, cache: bool | None = None):
        self.rows = rows
        self._cache: torch.Tensor | None = None
        n = len(rows)
        if n == 0:
            raise ValueError("VAESlices: no target slices")
        if cache is None:
            cache = 2 * n * self._get(0).numel() * 4 <= CACHE_LIMIT_BYTES
        if cache:
            self._cache = torch.stack([self._get(i) for i in range(2 * n)])

    def _get(self, index: int) -> torch.Tensor:
        item = self.rows[index // 2]
        if index % 2:
            return torch.as_tensor(item["fu"], dtype=torch.float32)
        bl = torch.as_tensor(item["bl"], dtype=torch.float32)
        centre = (bl.shape[0] // 3) // 2
        return bl[3 * centre : 3 * centre + 3]

    def __len__(self) -> int:
        return 2 * len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._cache[index] if self._cache is not None else self._get(index)


class VAEDataModule(pl.LightningDataModule):
    """Serves step-indexed micro-batches of :class:`VAESlices` (resume-exact, DDP-sharded by rank)."""

    def __init__(self, dataset: Dataset, batch_size: int, accumulate: int, max_steps: int, seed: int,
                 num_workers: int = 0):
        super().__init__()
        self.dataset, self.batch_size, self.accumulate = dataset, batch_size, accumulate
        self.max_steps, self.seed, self.num_workers = max_steps, seed, num_workers

    def _start_batch(self) -> int:
        return self.trainer.global_step * self.accumulate if self.trainer else 0

    def train_dataloader(self) -> DataLoader:
        sampler = common.StepIndexedBatchSampler(
            len(self.dataset), self.batch_size, self.seed,
            total_batches=2 * (self.max_steps + 1) * self.accumulate,
            start_batch=self._start_batch,
            rank=lambda: self.trainer.global_rank if self.trainer else 0,
            world_size=lambda: self.trainer.world_size if self.trainer else 1,
        )
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)


# ---------------------------------------------------------------------------------- batch shaping
def resolution_at(step: int, schedule: Sequence[Sequence[int]]) -> int:
    """Training size at ``step`` from ``[[size, steps], ...]``; after the schedule, its last size."""
    end = 0
    for size, steps in schedule:
        end += int(steps)
        if step < end:
            return int(size)
    return int(schedule[-1][0])


def resize_slices(x: torch.Tensor, size: int) -> torch.Tensor:
    """Downsample [B, 3, H, W] to ``size``: area-average for CT, nearest for the masks."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    ct = F.interpolate(x[:, :1], size=(size, size), mode="area" if size < x.shape[-1] else "bilinear")
    masks = F.interpolate(x[:, 1:], size=(size, size), mode="nearest")
    return torch.cat([ct, masks], dim=1)


def random_affine(x: torch.Tensor, generator: torch.Generator, rotate_deg: float, translate_frac: float,
                  scale_frac: float) -> torch.Tensor:
    """Random small rotation/scale/translation per slice, identical for CT and masks."""
    b = x.shape[0]

    def uniform(width: float) -> torch.Tensor:
        u = torch.rand(b, generator=generator, device=generator.device).to(x.device)
        return (2 * u - 1) * width

    angle = uniform(math.radians(rotate_deg))
    scale = 1 + uniform(scale_frac)
    tx, ty = uniform(2 * translate_frac), uniform(2 * translate_frac)  # normalised coords span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).float()
    ct = AffineTransform(normalized=True, mode="bilinear", padding_mode="zeros", align_corners=False)(
        x[:, :1].float(), theta)
    masks = AffineTransform(normalized=True, mode="nearest", padding_mode="zeros", align_corners=False)(
        x[:, 1:].float(), theta)
    return torch.cat([ct, masks], dim=1).to(x.dtype)


# ----------------------------------------------------------------------------------------- module
class VAEModule(pl.LightningModule):
    """Multi-head VAE + PatchGAN discriminator, trained with manual optimisation (see module doc)."""

    def __init__(self, vae_cfg: dict[str, Any], seed: int = 0):
        super().__init__()
        self.automatic_optimization = False
        self.cfg = vae_cfg
        self.seed = int(seed)
        self.vae = MultiHeadVAE(VAEConfig.from_cfg(vae_cfg))
        self.weights = LossWeights.from_cfg(vae_cfg["loss"])
        self.losses = VAELoss(self.weights)
        self.discriminator = (build_discriminator(self.weights.disc_channels, self.weights.disc_layers)
                              if self.weights.adv_weight > 0 else None)
        self.accumulate = int(vae_cfg["accumulate"])
        self.max_steps = int(vae_cfg["max_steps"])
        self.history: list[dict[str, float]] = []  # one entry per optimizer step (cycle-mean losses)
        self._micro = 0
        self._sums: dict[str, float] = {}

    def configure_optimizers(self) -> Any:
        opt_g = torch.optim.Adam(self.vae.parameters(), lr=float(self.cfg["lr"]))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=self.max_steps)
        optimizers = [opt_g]
        if self.discriminator is not None:
            optimizers.append(torch.optim.Adam(self.discriminator.parameters(), lr=self.weights.disc_lr))
        return optimizers, [{"scheduler": sched, "interval": "step"}]

    def on_train_start(self) -> None:
        # That vae.resolutions fit the latent factor is a config rule (hemexp.core.config), checked at load.
        self._micro, self._sums = 0, {}  # checkpoints are written at step boundaries only

    def prepare_batch(self, x: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
        """Progressive resolution, then augmentation."""
        size = min(resolution_at(step, self.cfg["resolutions"]), x.shape[-1])
        x = resize_slices(x, size)
        aug = self.cfg["augment"]
        if any(float(v) > 0 for v in aug.values()):
            x = random_affine(x, generator, float(aug["rotate_deg"]), float(aug["translate_frac"]),
                              float(aug["scale_frac"]))
        return x

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        step, micro = self.global_step, self._micro
        gen = common.step_generator(self.seed, step, micro, self.global_rank, self.device)
        x = self.prepare_batch(batch, step, gen)
        optimizers = self.optimizers()
        opt_g, opt_d = (optimizers[0], optimizers[1]) if isinstance(optimizers, list) else (optimizers, None)
        adversarial = opt_d is not None and self.losses.adversarial_on(step)

        with self.toggled_optimizer(opt_g) if opt_d is not None else contextlib.nullcontext():
            out, mu, sigma = self.vae(x, generator=gen)
            terms = self.losses.generator(x, out, mu, sigma, step, self.discriminator if adversarial else None)
            self.manual_backward(terms["total"] / self.accumulate)
        if adversarial:
            with self.toggled_optimizer(opt_d):
                terms["disc"] = self.losses.discriminator(x[:, :1], out["ct"], self.discriminator)
                self.manual_backward(self.weights.adv_weight * terms["disc"] / self.accumulate)
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value.detach()) / self.accumulate
        self._micro += 1
        if self._micro < self.accumulate:
            return

        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        if adversarial:  # not counted as a Lightning step: global_step stays = generator steps
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None, model=self)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
        record = {**self._sums, "step": step + 1, "size": float(x.shape[-1]), "lr": opt_g.param_groups[0]["lr"]}
        self.history.append(record)
        self.log_dict({f"train/{k}": v for k, v in record.items() if k != "step"}, on_step=True, prog_bar=False)
        self.log_dict({"loss": record["total"], "ct": record["ct"]}, on_step=True, prog_bar=True, logger=False)
        self._micro, self._sums = 0, {}


# ------------------------------------------------------------------------------------ run/preview
class PreviewCallback(pl.Callback):
    """Every ``every_n_steps`` and at the end: a reconstruction grid of fixed slices (rank 0), saved
    under ``run_dir/reconstructions/`` and logged to the active MLflow run."""

    def __init__(self, slices: torch.Tensor, run_dir: Path, every_n_steps: int):
        self.slices, self.run_dir, self.every = slices, Path(run_dir), max(1, every_n_steps)
        self._last = -1

    def _render(self, trainer: pl.Trainer, module: VAEModule) -> None:
        step = trainer.global_step
        if step == self._last or not trainer.is_global_zero:
            return

        was_training = module.vae.training
        module.vae.eval()
        recon = reconstruct(module.vae, self.slices.to(module.device)).cpu()
        module.vae.train(was_training)
        path = self.run_dir / "reconstructions" / f"step_{step:06d}.png"
        reconstruction_figure(self.slices, recon, path, title=f"VAE reconstructions, step {step}")
        _mlflow_artifact(path, "reconstructions")
        self._last = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self._render(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._render(trainer, pl_module)


def _mlflow_artifact(path: Path, artifact_path: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def preview_slices(dataset: Dataset, n: int = 4) -> torch.Tensor:
    """``n`` evenly spaced training slices (fixed across runs) for the reconstruction grids."""
    idx = np.unique(np.linspace(0, len(dataset) - 1, num=min(n, len(dataset))).round().astype(int))
    return torch.stack([dataset[int(i)] for i in idx])


def fit_vae(vae_cfg: dict[str, Any], dataset: Dataset, run_dir: str | Path, seed: int = 0,
            resume: bool | None = None, fingerprint: str | None = None,
            callbacks: Sequence[pl.Callback] = (), trainer_overrides: dict[str, Any] | None = None,
            ) -> tuple[VAEModule, pl.Trainer]:
    """Train (or resume) on ``dataset`` of [3, H, W] slices; checkpoints in ``run_dir``.

    ``fingerprint`` identifies the training setup for resume (default: the ``vae`` section + seed +
    dataset size). Returns the module (final weights) and the trainer.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = fingerprint or common.training_fingerprint(_fingerprint_cfg(vae_cfg), seed, len(dataset))
    ckpt = common.resume_checkpoint(run_dir, fingerprint, resume)
    pl.seed_everything(seed, workers=True, verbose=False)  # model init; the rest is step-indexed
    module = VAEModule(vae_cfg, seed=seed)
    data = VAEDataModule(dataset, int(vae_cfg["batch_size"]), int(vae_cfg["accumulate"]),
                         int(vae_cfg["max_steps"]), seed, int(vae_cfg.get("num_workers", 0)))
    every = int(vae_cfg["checkpoint_every"])
    cbs = [common.FingerprintCallback(fingerprint), common.MLflowStepMetrics(int(vae_cfg.get("log_every", 10))),
           PreviewCallback(preview_slices(dataset), run_dir, every), *callbacks]
    trainer = common.make_trainer(vae_cfg, run_dir, cbs, find_unused_parameters=True, **(trainer_overrides or {}))
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    trainer.save_checkpoint(run_dir / common.LAST_CKPT)  # a rerun of a finished run resumes at the end
    if trainer.global_step < module.max_steps:  # stopped by a signal: no final model from a partial run
        raise RuntimeError(f"VAE training stopped at step {trainer.global_step} of {module.max_steps}; "
                           f"rerun to resume from {run_dir / common.LAST_CKPT}")
    return module, trainer


def _fingerprint_cfg(vae_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``vae`` keys that change what is trained (not how often it is saved or logged)."""
    return {k: v for k, v in vae_cfg.items() if k not in ("checkpoint_every", "log_every", "num_workers")}


# ----------------------------------------------------------------------------------- entry point


def split_shards(cfg: dict[str, Any], split: str) -> list[Path]:
    """Existing shard files of the cohort's patients in ``split`` (missing ones are reported)."""

    paths = [Layout.of(cfg).shard(p.patient_id)
             for p in patients(cfg) if p.split == split]
    missing = [p for p in paths if not p.exists()]
    if missing:
        log.warning("%d %s shard(s) missing, e.g. %s", len(missing), split, missing[0])
    return [p for p in paths if p.exists()]


def target_slices(cfg: dict[str, Any], split: str, cache: bool | None = None) -> VAESlices:
    """Baseline and follow-up target slices of one split, as the VAE sees them."""

    shards = split_shards(cfg, split)
    if not shards:
        raise FileNotFoundError(f"no {split} shards under {Layout.of(cfg).shards_dir}")
    rows = SliceDataset.from_config(cfg, shards, context=1, splits=(split,), only_targets=True)
    return VAESlices(rows, cache=cache)


def train_vae(cfg: dict[str, Any], resume: bool | None = None) -> Path:
    """``hemexp train-vae``: train on the train split's target slices, write ``vae.pt``, track in MLflow."""

    vae_cfg = cfg["vae"]
    run_dir = Layout.of(cfg).vae_dir
    dataset = target_slices(cfg, "train")
    shard_names = sorted(p.name for p in split_shards(cfg, "train"))
    fingerprint = common.training_fingerprint(_fingerprint_cfg(vae_cfg), cfg["seed"], cfg["preprocess"],
                                              cfg["shards"], shard_names)
    log.info("VAE training on %d slices (%d shards), run dir %s", len(dataset), len(shard_names), run_dir)
    rank0 = common.global_rank() == 0
    resume = common.resume_or_start_afresh(run_dir, fingerprint, resume, forget=(RUN_ID_FILE,))
    tracking = start_run(cfg, "vae", run_dir) if rank0 else contextlib.nullcontext()
    with tracking:
        module, trainer = fit_vae(vae_cfg, dataset, run_dir, seed=int(cfg["seed"]), resume=resume,
                                  fingerprint=fingerprint)
        out = run_dir / "vae.pt"
        if trainer.is_global_zero:
            module.vae.save(out)
            _mlflow_artifact(out, "model")
    log.info("wrote %s after %d steps", out, trainer.global_step)
    return out
