"""Training of the conditional latent diffusion model (paper §2.4-2.5) with Lightning.

One run per variant (``diffusion.variants``) in ``results/models/diffusion/{v}/``. The objective is
v-prediction of the normalised progression ``Δz = norm(z_fu) - norm(z_bl)`` with MONAI's scheduler
(``add_noise``/``get_velocity``), min-SNR-γ weighting, Adam, gradient accumulation and clipping,
mixed precision, EMA of the weights (Lightning's ``EMAWeightAveraging``), balanced batches and
horizontal flips. Hardware, checkpoints, exact resume and MLflow plumbing are
:mod:`hemexp.engine.trainer`'s, shared with the VAE.

Exact resume: data order is a function of the micro-batch position (:class:`BalancedStepBatchSampler`,
built from :class:`~hemexp.engine.trainer.StepIndexedBatchSampler`) and every random draw of a step
(timesteps, noise, clinical dropout, flips) comes from
:func:`~hemexp.engine.trainer.step_generator` (seed, step, micro-batch, rank).

Horizontal flips use the cached encodings of the left-right *mirrored* slices (``z_*_flip``, see
:mod:`hemexp.diffusion.latents`), for Δz, the baseline and every context slice alike. Mirroring the latent grid
itself would be cheaper but is not the latent of the mirrored image: the channels encode oriented
features, and on the demo VAE a mirrored latent decodes with IPH Dice 0.64 instead of 0.89.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hemexp.cohort.patients import patients
from hemexp.core.clinical import CLINICAL_NAMES
from hemexp.core.config import variants
from hemexp.core.files import read_json, save_figure, write_json
from hemexp.core.layout import Layout
from hemexp.diffusion.ddim import ddim_sample
from hemexp.diffusion.latents import PatientLatents, check_stats, denormalise, load_latents, normalise
from hemexp.diffusion.lesion import near_baseline_hematoma, weights_from_near
from hemexp.diffusion.model import (
    ConditionalLatentUNet,
    build_model,
    ddpm_scheduler,
    delta_rms,
    min_snr_weight,
    model_config,
    save_diffusion,
    scheduler_config,
    snr,
)
from hemexp.engine import trainer as common
from hemexp.tracking.runs import RUN_ID_FILE, start_run
from hemexp.vae.data import step_slices_from_config
from hemexp.vae.model import load_vae

log = logging.getLogger(__name__)

# Keys of the diffusion section that do not change what is trained (excluded from the resume fingerprint).
NON_TRAINING_KEYS = ("variants", "checkpoint_every", "log_every", "devices", "strategy")


# ------------------------------------------------------------------------------------------- data
class LatentPairs(Dataset):
    """Target slices of training patients as diffusion items (all tensors already normalised).

    Item: ``delta`` [C, h, w] = norm(z_fu) - norm(z_bl) of the centre slice; ``baseline``
    [C*context, h, w] = normalised baseline latents of the context slices in z order (centre in the
    middle); ``clinical`` [7]; ``flag`` int64. With ``flips``, also ``delta_flip``/``baseline_flip``
    from the mirrored slices' encodings. With ``lesion_weight`` > 0, also ``weight`` [1, h, w], the
    loss weights of :func:`~hemexp.diffusion.lesion.lesion_weight_map` (and ``weight_flip``, mirrored).
    ``flags`` gives every item's expansion label; :meth:`near` its cells near the baseline hematoma.
    """

    def __init__(self, patients: list[PatientLatents], stats: dict[str, Any], context: int, step_slices: int,
                 flips: bool = False, lesion_weight: float = 0.0):
        self.context, self.step, self.flips = int(context), int(step_slices), bool(flips)
        near = [near_baseline_hematoma(p.iph_bl_cells) for p in patients]
        self._near = [torch.from_numpy(m) for m in near]
        self._weights = ([torch.from_numpy(weights_from_near(m, lesion_weight)) for m in near]
                         if lesion_weight > 0 else None)

        def norm(arrays: list[np.ndarray]) -> list[torch.Tensor]:
            return [torch.from_numpy(normalise(a, stats).astype(np.float32)) for a in arrays]

        self._bl, self._fu = norm([p.z_bl for p in patients]), norm([p.z_fu for p in patients])
        if self.flips:
            self._bl_flip, self._fu_flip = norm([p.z_bl_flip for p in patients]), norm([p.z_fu_flip for p in patients])
        self._clinical = [torch.from_numpy(p.clinical.astype(np.float32)) for p in patients]
        self._context = [
            {int(r): torch.from_numpy(p.context_rows(int(r), self.context, self.step)) for r in p.target_rows}
            for p in patients
        ]
        self.index = [(i, int(r)) for i, p in enumerate(patients) for r in p.target_rows]
        self.flags = np.array([patients[i].flag for i, _ in self.index], dtype=np.int64)
        self.patient_ids = [patients[i].patient_id for i, _ in self.index]
        if not self.index:
            raise ValueError("no target slices in the training latents")

    def __len__(self) -> int:
        return len(self.index)

    def near(self, i: int) -> torch.Tensor:
        """Bool ``[h, w]``: item ``i``'s latent cells near its baseline hematoma (the fit diagnostics' region)."""
        p, row = self.index[int(i)]
        return self._near[p][row]

    def delta_rms(self) -> float:
        """RMS of Δz over every item (as stored, not mirrored): the ``unit_delta`` scale."""
        return delta_rms([self._fu[p][row] - self._bl[p][row] for p, row in self.index])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        p, row = self.index[int(i)]
        rows = self._context[p][row]
        item = {
            "delta": self._fu[p][row] - self._bl[p][row],
            "baseline": self._bl[p][rows].flatten(0, 1),
            "clinical": self._clinical[p],
            "flag": torch.tensor(int(self.flags[int(i)]), dtype=torch.int64),
        }
        if self.flips:
            item["delta_flip"] = self._fu_flip[p][row] - self._bl_flip[p][row]
            item["baseline_flip"] = self._bl_flip[p][rows].flatten(0, 1)
        if self._weights is not None:
            item["weight"] = self._weights[p][row]
            if self.flips:  # the map of the mirrored slice is the mirrored map (whole cells pool alike)
                item["weight_flip"] = self._weights[p][row].flip(-1)
        return item


class BalancedStepBatchSampler(Sampler[list[int]]):
    """Micro-batches with equally many expansion and non-expansion items, step-indexed for exact resume.

    Two :class:`~hemexp.engine.trainer.StepIndexedBatchSampler` streams, one per class (each a seeded
    permutation per pass, so the minority class is cycled through rather than drawn with
    replacement): micro-batch ``b`` = ``B // 2`` expansion items + ``B - B // 2`` non-expansion items.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int, total_batches: int, **stream_kwargs: Any):
        labels = np.asarray(labels)
        self.pos, self.neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        if len(self.pos) == 0 or len(self.neg) == 0:
            raise ValueError(f"balanced batches need both classes: {len(self.pos)} expansion and "
                             f"{len(self.neg)} non-expansion target slices")
        half = int(batch_size) // 2
        if half < 1:
            raise ValueError("balanced batches need batch_size >= 2")
        self.streams = (
            common.StepIndexedBatchSampler(len(self.pos), half, seed, total_batches, **stream_kwargs),
            common.StepIndexedBatchSampler(len(self.neg), int(batch_size) - half, seed + 1, total_batches,
                                           **stream_kwargs),
        )
        self.total_batches = int(total_batches)

    def batch(self, b: int) -> list[int]:
        pos, neg = self.streams
        return [int(self.pos[i]) for i in pos.batch(b)] + [int(self.neg[i]) for i in neg.batch(b)]

    def __iter__(self):
        for b in range(int(self.streams[0].start_batch()), self.total_batches):
            yield self.batch(b)

    def __len__(self) -> int:
        return self.total_batches


class LatentDataModule(pl.LightningDataModule):
    """Serves step-indexed micro-batches of :class:`LatentPairs` (resume-exact, sharded by rank)."""

    def __init__(self, dataset: LatentPairs, batch_size: int, accumulate: int, max_steps: int, seed: int,
                 balanced: bool):
        super().__init__()
        self.dataset, self.batch_size, self.accumulate = dataset, int(batch_size), int(accumulate)
        self.max_steps, self.seed, self.balanced = int(max_steps), int(seed), bool(balanced)

    def _start_batch(self) -> int:
        return self.trainer.global_step * self.accumulate if self.trainer else 0

    def batch_sampler(self) -> Sampler[list[int]]:
        kwargs = {
            "start_batch": self._start_batch,
            "rank": lambda: self.trainer.global_rank if self.trainer else 0,
            "world_size": lambda: self.trainer.world_size if self.trainer else 1,
        }
        total = (self.max_steps + 1) * self.accumulate
        if self.balanced:
            return BalancedStepBatchSampler(self.dataset.flags, self.batch_size, self.seed, total, **kwargs)
        return common.StepIndexedBatchSampler(len(self.dataset), self.batch_size, self.seed, total, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=self.batch_sampler(), num_workers=0,
                          pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------------------- module
class DiffusionModule(pl.LightningModule):
    """v-prediction (or ε / x0) training of :class:`~hemexp.diffusion.model.ConditionalLatentUNet`."""

    def __init__(self, model_cfg: dict[str, Any], sched_cfg: dict[str, Any], diffusion_cfg: dict[str, Any],
                 seed: int = 0):
        super().__init__()
        self.model_cfg, self.sched_cfg = model_cfg, sched_cfg
        self.model = build_model(model_cfg)
        self.scheduler = ddpm_scheduler(sched_cfg)
        self.lr = float(diffusion_cfg["lr"])
        self.gamma = diffusion_cfg["min_snr_gamma"]
        self.p_drop = float(diffusion_cfg["clinical_dropout"])
        self.hflip = bool(diffusion_cfg["hflip"])
        self.accumulate = int(diffusion_cfg["accumulate"])
        self.seed = int(seed)
        self.history: list[float] = []  # weighted loss per micro-batch (for summaries and tests)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def draws(self, batch_size: int, shape: tuple[int, ...], step: int, micro: int) -> dict[str, torch.Tensor]:
        """Every random quantity of one micro-batch, from the step-indexed generator (on CPU)."""
        gen = common.step_generator(self.seed, step, micro, self.global_rank)
        return {
            "t": torch.randint(0, self.scheduler.num_train_timesteps, (batch_size,), generator=gen),
            "noise": torch.randn(shape, generator=gen),
            "drop": torch.rand(batch_size, generator=gen) < self.p_drop,
            "flip": torch.rand(batch_size, generator=gen) < (0.5 if self.hflip else 0.0),
        }

    def loss(self, batch: dict[str, torch.Tensor], draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(min-SNR- and lesion-weighted loss, unweighted per-sample MSE) of one micro-batch."""
        d = {k: v.to(self.device) for k, v in draws.items()}
        delta, baseline, cells = batch["delta"], batch["baseline"], batch.get("weight")
        if "delta_flip" in batch:  # mirrored slices' latents for Δz and every baseline slice alike
            flip = d["flip"].view(-1, 1, 1, 1)
            delta = torch.where(flip, batch["delta_flip"], delta)
            baseline = torch.where(flip, batch["baseline_flip"], baseline)
            if cells is not None:
                cells = torch.where(flip, batch["weight_flip"], cells)
        delta = delta / self.model.delta_scale  # the model diffuses Δz in its own units (unit_delta)
        x_t = self.scheduler.add_noise(delta, d["noise"], d["t"])
        kind = self.sched_cfg["prediction_type"]
        target = {"v_prediction": lambda: self.scheduler.get_velocity(delta, d["noise"], d["t"]),
                  "epsilon": lambda: d["noise"], "sample": lambda: delta}[kind]()
        pred = self.model(x_t, d["t"], baseline, batch["clinical"], batch["flag"], d["drop"])
        err = (pred.float() - target.float()).pow(2)
        mse = err.mean(dim=(1, 2, 3))
        fit = mse if cells is None else (err * cells).mean(dim=(1, 2, 3))  # lesion weights: mean 1 per slice
        weight = min_snr_weight(snr(self.scheduler.alphas_cumprod, d["t"]), self.gamma, kind)
        return (weight * fit).mean(), mse

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        micro = batch_idx % self.accumulate
        draws = self.draws(batch["delta"].shape[0], tuple(batch["delta"].shape), self.global_step, micro)
        loss, mse = self.loss(batch, draws)
        self.history.append(float(loss.detach()))
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/mse", mse.mean(), on_step=True)
        return loss


# ----------------------------------------------------------------------------------------- fitting
def fingerprint_cfg(diffusion_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``diffusion`` keys that change what is trained (resume refuses a checkpoint of other ones)."""
    return {k: v for k, v in diffusion_cfg.items() if k not in NON_TRAINING_KEYS}


def fit_diffusion(module: DiffusionModule, dataset: LatentPairs, diffusion_cfg: dict[str, Any],
                  run_dir: str | Path, fingerprint: str, resume: bool | None = None,
                  trainer_overrides: dict[str, Any] | None = None,
                  extra_callbacks: tuple[pl.Callback, ...] = ()) -> pl.Trainer:
    """Train ``module`` (or resume it from ``run_dir/last.ckpt``); on return it holds the EMA weights."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = common.resume_checkpoint(run_dir, fingerprint, resume)
    data = LatentDataModule(dataset, diffusion_cfg["batch_size"], diffusion_cfg["accumulate"],
                            diffusion_cfg["max_steps"], module.seed, diffusion_cfg["balanced_batches"])
    callbacks = [common.FingerprintCallback(fingerprint), common.MLflowStepMetrics(int(diffusion_cfg["log_every"])),
                 common.ema_callback(float(diffusion_cfg["ema_decay"])), *extra_callbacks]
    overrides = {"accumulate_grad_batches": int(diffusion_cfg["accumulate"]),
                 "gradient_clip_val": diffusion_cfg["grad_clip"], **(trainer_overrides or {})}
    trainer = common.make_trainer(diffusion_cfg, run_dir, callbacks, **overrides)
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    # A rerun of a finished run resumes at the end: both the checkpoint's live and averaged weights are
    # the EMA weights now (copied in by the EMA callback's on_train_end), so model.pt is rewritten as is.
    trainer.save_checkpoint(run_dir / common.LAST_CKPT)
    return trainer


def train_diffusion(cfg: dict[str, Any], variant: str, resume: bool | None = None,
                    trainer_overrides: dict[str, Any] | None = None) -> Path:
    """``hemexp train-diffusion {v}``: train one variant on the training latents; write ``model.pt``,
    ``sample_grid.png`` and ``summary.json``; track everything in the variant's MLflow run."""

    spec = variants(cfg)[variant]
    dcfg = dict(cfg["diffusion"])
    if spec.max_steps is not None:  # a training-length row: its steps enter the fingerprint like any key
        dcfg["max_steps"] = spec.max_steps
    run_dir = Layout.of(cfg).diffusion_dir(variant)
    lats, stats, train_ids = training_latents(cfg)
    step = step_slices_from_config(cfg)
    dataset = LatentPairs(lats, stats, spec.context, step, flips=bool(dcfg["hflip"]), lesion_weight=spec.lesion_weight)
    channels = int(lats[0].z_bl.shape[1])
    del lats  # the dataset holds normalised copies; free the raw cache (GBs at paper scale)
    scale = dataset.delta_rms() if spec.unit_delta else 1.0
    model_cfg = model_config(dcfg, spec.context, spec.conditioning, channels, spec.cross_attention, scale,
                             spec.scale_shift, spec.flag_channel)
    sched_cfg = scheduler_config(dcfg)
    info = {"name": variant, "context": spec.context, "conditioning": spec.conditioning,
            "latent_channels": channels, "step_slices": step, "context_step_mm": cfg["shards"]["context_step_mm"],
            "clinical_names": list(CLINICAL_NAMES), "cross_attention": spec.cross_attention,
            "unit_delta": spec.unit_delta, "delta_scale": scale, "scale_shift": spec.scale_shift,
            "lesion_weight": spec.lesion_weight, "flag_channel": spec.flag_channel}
    fingerprint = common.training_fingerprint(fingerprint_cfg(dcfg), info, cfg["seed"], stats["mean"],
                                              stats["std"], train_ids)
    rank0 = common.global_rank() == 0
    resume = common.resume_or_start_afresh(run_dir, fingerprint, resume, forget=(RUN_ID_FILE,))
    log.info("diffusion %s: %d target slices from %d patients (%d expansion), Δz scale %.4g, run dir %s",
             variant, len(dataset), len(train_ids), int(dataset.flags.sum()), scale, run_dir)
    pl.seed_everything(int(cfg["seed"]), workers=True, verbose=False)  # init; the rest is step-indexed
    module = DiffusionModule(model_cfg, sched_cfg, dcfg, seed=int(cfg["seed"]))
    tracking = start_run(cfg, "diffusion", run_dir, variant=variant) if rank0 else contextlib.nullcontext()
    with tracking:
        start = time.perf_counter()
        trainer = fit_diffusion(module, dataset, dcfg, run_dir, fingerprint, resume, trainer_overrides)
        seconds = time.perf_counter() - start
        out = run_dir / "model.pt"
        if trainer.is_global_zero:
            module.model.eval()
            save_diffusion(out, module.model, model_cfg, info, sched_cfg)
            grid = sample_grid(module.model, sched_cfg, dataset, stats, Layout.of(cfg).vae_model, run_dir / "sample_grid.png",
                               seed=int(cfg["seed"]))
            summary = {"variant": info, "steps": trainer.global_step, "train_seconds": seconds,
                       "n_items": len(dataset), "n_patients": len(train_ids),
                       "n_expansion_items": int(dataset.flags.sum()),
                       "final_loss": _mean_tail(module.history), "first_loss": _mean_head(module.history),
                       "parameters": sum(p.numel() for p in module.model.parameters())}
            write_json(run_dir / "summary.json", summary)
            _log_mlflow(out, grid, summary)
    log.info("wrote %s after %d steps (%.0f s)", out, trainer.global_step, seconds)
    return out


def training_latents(cfg: dict[str, Any]) -> tuple[list[PatientLatents], dict[str, Any], list[str]]:
    """Cached latents of the cohort's training patients and the latent stats (missing files: error)."""

    ids = sorted(p.patient_id for p in patients(cfg) if p.split == "train")
    missing = [pid for pid in ids if not Layout.of(cfg).latents(pid).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} training latent file(s) missing, e.g. {Layout.of(cfg).latents(missing[0])}"
                                " (run `hemexp encode` first)")
    lats = [load_latents(Layout.of(cfg).latents(pid)) for pid in ids]
    wrong = [lat.patient_id for lat in lats if lat.split != "train"]
    if wrong:
        raise ValueError(f"latent files of {wrong} are not from the train split; re-encode them")
    stats = read_json(Layout.of(cfg).latent_stats)
    check_stats(stats, int(lats[0].z_bl.shape[1]))
    return lats, stats, ids


def _mean_head(values: list[float]) -> float | None:
    """Mean weighted loss of the first 10 % of micro-batches (a noisy quantity: t is random)."""
    return float(np.mean(values[: max(1, len(values) // 10)])) if values else None


def _mean_tail(values: list[float]) -> float | None:
    """Mean weighted loss of the last 10 % of micro-batches."""
    return float(np.mean(values[-max(1, len(values) // 10) :])) if values else None


def _log_mlflow(model_path: Path, grid_path: Path, summary: dict[str, Any]) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_metrics({k: float(summary[k]) for k in ("train_seconds", "final_loss", "parameters")
                        if summary.get(k) is not None})
    mlflow.log_artifact(str(grid_path), artifact_path="samples")
    mlflow.log_artifact(str(model_path.with_name("summary.json")))


# -------------------------------------------------------------------------------------- sample grid
GRID_STEPS = 20  # DDIM steps of the training-time preview (sampling uses sampling.ddim_steps)


def grid_items(flags: np.ndarray, change: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` items, half expansion and half non-expansion where possible: in each class the
    slices with the largest progression ``||Δz||`` (a grid of unchanged edge slices shows nothing)."""
    picks: list[int] = []
    for label, k in ((1, n // 2), (0, n - n // 2)):
        pool = np.flatnonzero(flags == label)
        picks += pool[np.argsort(-change[pool], kind="stable")[:k]].tolist()
    return picks


@torch.no_grad()
def sample_grid(model: ConditionalLatentUNet, sched_cfg: dict[str, Any], dataset: LatentPairs,
                stats: dict[str, Any], vae_file: str | Path, out: str | Path, n: int = 4, seed: int = 0,
                steps: int = GRID_STEPS) -> Path:
    """PNG of a few DDIM samples decoded by the VAE, beside the decoded baseline and true follow-up.

    Rows are training slices (expansion first, see :func:`grid_items`); columns baseline / true
    follow-up / sample, CT with the IPH contour (P > 0.5). Decoding the *cached* latents (not the original images) keeps the three
    columns comparable: all pass through the same VAE.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    device = next(model.parameters()).device
    vae = load_vae(vae_file, map_location=device)
    change = np.array([float(dataset[i]["delta"].norm()) for i in range(len(dataset))])
    items = [dataset[i] for i in grid_items(dataset.flags, change, n)]
    batch = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
    gen = torch.Generator().manual_seed(int(seed))
    delta_hat = ddim_sample(model, sched_cfg, batch["baseline"], batch["clinical"], batch["flag"], steps,
                            generator=gen).to(device)
    c = model.latent_channels
    centre = batch["baseline"][:, c * (model.context // 2) : c * (model.context // 2 + 1)]
    columns = {"baseline": centre, "true follow-up": centre + batch["delta"], "sample": centre + delta_hat}
    decoded = {k: vae.decode_probs(denormalise(z, stats)) for k, z in columns.items()}
    fig, axes = plt.subplots(len(items), 3, figsize=(6, 2 * len(items)), squeeze=False)
    for r in range(len(items)):
        for col, (name, out_r) in enumerate(decoded.items()):
            ax = axes[r, col]
            ax.imshow(out_r["ct"][r, 0].float().cpu(), cmap="gray", vmin=0, vmax=1)
            ax.contour(out_r["iph"][r, 0].float().cpu(), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
        axes[r, 0].set_ylabel(f"flag {int(batch['flag'][r])}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out, dpi=80)
    return Path(out)
