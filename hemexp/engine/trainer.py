"""Lightning plumbing shared by the VAE and diffusion trainers.

What every HemExp training run needs and Lightning does not decide for us:

* hardware from config: ``precision: auto`` -> ``bf16-mixed`` on a GPU that supports it (else
  ``16-mixed``), ``32-true`` on CPU; ``devices``/``strategy: ddp`` on GPUs, one process on CPU;
* a checkpoint (``last.ckpt``) every N optimizer steps, and automatic resume from it — but only when
  it was written by the same training setup (:func:`resume_checkpoint` compares a fingerprint stored
  in the checkpoint), so a config change never silently continues an old run;
* **exact resume**: data order and all training noise are functions of the optimizer step, not of a
  global RNG stream that a checkpoint does not capture. :class:`StepIndexedBatchSampler` serves
  micro-batch ``b`` of the run from a per-epoch seeded permutation and starts where the restored
  ``global_step`` says; :func:`step_generator` seeds a ``torch.Generator`` per (seed, step, micro-batch,
  rank) for augmentation and sampling noise;
* per-step metrics to the active MLflow run (:class:`MLflowStepMetrics`), and EMA weights
  (:func:`ema_callback`, Lightning's own ``EMAWeightAveraging``).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar
from torch.utils.data import Sampler

from hemexp.core.errors import ProductError

log = logging.getLogger(__name__)

LAST_CKPT = "last.ckpt"
FINGERPRINT_KEY = "hemexp_fingerprint"


# ----------------------------------------------------------------------------------------- hardware
def accelerator() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, accel: str | None = None) -> str:
    """``auto`` -> bf16-mixed (GPU with bf16) / 16-mixed (older GPU) / 32-true (CPU); others pass through."""
    accel = accel or accelerator()
    if precision != "auto":
        return "32-true" if precision == "32" else precision
    if accel == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def resolve_devices(devices: int, strategy: str, accel: str | None = None,
                    find_unused_parameters: bool = False) -> tuple[int, str]:
    """(devices, strategy) for the Trainer. CPU runs stay single-process whatever the config says."""
    accel = accel or accelerator()
    if accel == "cpu":
        if devices > 1 or strategy == "ddp":
            log.info("CPU run: using one process (devices=%d, strategy=%s apply to GPUs only)", devices, strategy)
        return 1, "auto"
    n = min(int(devices), torch.cuda.device_count())
    if n < devices:
        log.warning("config asks for %d GPUs, %d visible: using %d", devices, n, n)
    if strategy == "ddp" and n > 1:
        return n, "ddp_find_unused_parameters_true" if find_unused_parameters else "ddp"
    return n, "auto"


def global_rank() -> int:
    """This process's rank before the Trainer exists (Lightning reads the launcher's env variables)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


# ------------------------------------------------------------------------------- determinism/resume
def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose stream depends only on (seed, step, micro-batch, rank): resume-exact noise."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(micro), int(rank)]).generate_state(2)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


class StepIndexedBatchSampler(Sampler[list[int]]):
    """Micro-batches as a pure function of their position in the run.

    Global micro-batch ``b`` holds sample positions ``[b*B*W, (b+1)*B*W)`` (B = per-rank batch,
    W = world size); rank ``r`` takes its B-slice. Position ``p`` maps to item
    ``perm_e[p % n]`` with ``perm_e`` a permutation seeded by ``(seed, e = p // n)``. Iteration starts at
    ``start_batch()`` (e.g. ``global_step * accumulate``, read after a checkpoint is restored), so a
    resumed run sees exactly the batches an uninterrupted one would. ``weights`` (optional) replace the
    permutation by seeded weighted draws with replacement (e.g. class balancing).
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, total_batches: int,
                 start_batch: Callable[[], int] = lambda: 0, rank: Callable[[], int] = lambda: 0,
                 world_size: Callable[[], int] = lambda: 1, weights: np.ndarray | None = None):
        if n_items < 1:
            raise ValueError("StepIndexedBatchSampler: the dataset is empty")
        self.n, self.batch_size, self.seed = int(n_items), int(batch_size), int(seed)
        self.total_batches = int(total_batches)
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.weights = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
        self._cache: dict[int, np.ndarray] = {}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch])
            if self.weights is None:
                order = rng.permutation(self.n)
            else:
                order = rng.choice(self.n, size=self.n, replace=True, p=self.weights)
            self._cache = {epoch: order}  # keep one epoch: memory stays O(n)
        return self._cache[epoch]

    def batch(self, b: int) -> list[int]:
        """Indices of global micro-batch ``b`` for this rank."""
        world, rank = int(self.world_size()), int(self.rank())
        first = b * self.batch_size * world + rank * self.batch_size
        out = []
        for p in range(first, first + self.batch_size):
            out.append(int(self._epoch_order(p // self.n)[p % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        start = int(self.start_batch())
        for b in range(start, self.total_batches):
            yield self.batch(b)

    def __len__(self) -> int:
        return self.total_batches


def training_fingerprint(*parts: Any) -> str:
    """Short hash of whatever defines a training run (config sections, input list)."""
    import hashlib
    import json

    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class FingerprintCallback(Callback):
    """Stores the run's fingerprint in every checkpoint, so resume can refuse a foreign one."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[FINGERPRINT_KEY] = self.fingerprint


def checkpoint_fingerprint(path: str | Path) -> str | None:
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return ckpt.get(FINGERPRINT_KEY)


def resume_checkpoint(run_dir: str | Path, fingerprint: str, resume: bool | None) -> Path | None:
    """The checkpoint to resume from: ``run_dir/last.ckpt`` when it matches ``fingerprint``.

    ``resume=True`` demands it (missing or mismatching -> error); ``None`` resumes automatically when
    it matches and otherwise starts afresh (a mismatching checkpoint is renamed ``last.stale.ckpt``);
    ``False`` never resumes.
    """
    path = Path(run_dir) / LAST_CKPT
    if resume is False or (resume is None and not path.exists()):
        return None
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        found = checkpoint_fingerprint(path)
    except Exception as err:  # noqa: BLE001 - truncated by a kill during its write, or otherwise damaged
        corrupt = path.with_name("last.corrupt.ckpt")
        path.replace(corrupt)
        log.warning("%s is unreadable (%s: %s); moved to %s and starting afresh", path, type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "", corrupt)
        if resume:
            raise ProductError(corrupt, "checkpoint truncated or corrupt; rerun without --resume to start "
                               "afresh") from err
        return None
    if found == fingerprint:
        log.info("resuming from %s", path)
        return path
    if resume:
        raise ValueError(f"--resume: {path} was written by a different training setup "
                         f"(fingerprint {found} != {fingerprint}); remove it to start afresh")
    stale = path.with_name("last.stale.ckpt")
    path.replace(stale)
    log.warning("%s belongs to a different training setup; moved to %s and starting afresh", path, stale)
    return None


def resume_or_start_afresh(run_dir: str | Path, fingerprint: str, resume: bool | None,
                           forget: tuple[str, ...] = ()) -> bool | None:
    """The ``resume`` to train with: on rank 0, a run that cannot resume starts afresh (``False``) and the
    files in ``forget`` (the MLflow run id) are removed, so a fresh training is also a fresh tracked run."""
    if global_rank() == 0 and resume_checkpoint(run_dir, fingerprint, resume) is None:
        for name in forget:
            (Path(run_dir) / name).unlink(missing_ok=True)
        return False
    return resume


# -------------------------------------------------------------------------------------- callbacks
def checkpoint_callback(run_dir: str | Path, every_n_steps: int) -> ModelCheckpoint:
    """Writes only ``run_dir/last.ckpt`` every N optimizer steps (Lightning's own write is atomic)."""
    return ModelCheckpoint(dirpath=str(run_dir), every_n_train_steps=int(every_n_steps), save_last=True,
                           save_top_k=0, save_on_train_epoch_end=False)


def progress_bar() -> TQDMProgressBar:
    """Live bar on a terminal; sparse updates when logging to a file (Snakemake job logs)."""
    return TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50)


def ema_callback(decay: float, start_step: int = 0) -> EMAWeightAveraging:
    """Exponential moving average of the weights (Lightning's ``EMAWeightAveraging``); the averaged
    weights replace the live ones at the end of training and are saved in checkpoints."""
    return EMAWeightAveraging(decay=decay, update_starting_at_step=start_step)


class MLflowStepMetrics(Callback):
    """Logs ``trainer.callback_metrics`` whose name starts with ``prefix`` to the active MLflow run,
    every ``every_n_steps`` optimizer steps (rank 0 only; no run active -> no-op)."""

    def __init__(self, every_n_steps: int, prefix: str = "train/"):
        self.every = max(1, int(every_n_steps))
        self.prefix = prefix
        self._last = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last or step % self.every or not trainer.is_global_zero:
            return
        import mlflow

        if mlflow.active_run() is None:
            return
        metrics = {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(self.prefix)}
        if metrics:
            mlflow.log_metrics(metrics, step=step)
        self._last = step


# Lightning warnings that do not apply here: checkpoints are written after complete optimizer steps
# on purpose, our batch samplers resume by step (exactly), and SLURM jobs are launched by Snakemake.
_IRRELEVANT_WARNINGS = (
    r"Using ModelCheckpoint with manual optimization",
    r"You're resuming from a checkpoint that ended before the epoch ended",
    r"The `srun` command is available on your system but is not used",
)


def make_trainer(section: dict[str, Any], run_dir: str | Path, callbacks: list[Callback],
                 find_unused_parameters: bool = False, **overrides: Any) -> Trainer:
    """A Trainer from a training config section (``precision``, ``devices``, ``strategy``,
    ``max_steps``, ``checkpoint_every``) with checkpointing, progress bar and no Lightning logger
    (metrics go to MLflow through :class:`MLflowStepMetrics`)."""
    for pattern in _IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    accel = accelerator()
    devices, strategy = resolve_devices(int(section["devices"]), section["strategy"], accel, find_unused_parameters)
    kwargs: dict[str, Any] = {
        "accelerator": accel,
        "devices": devices,
        "strategy": strategy,
        "precision": resolve_precision(str(section["precision"]), accel),
        "max_steps": int(section["max_steps"]),
        "max_epochs": -1,
        "default_root_dir": str(run_dir),
        "logger": False,
        "callbacks": [checkpoint_callback(run_dir, int(section["checkpoint_every"])), *callbacks],
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "use_distributed_sampler": False,  # our batch samplers shard by rank themselves
        "enable_model_summary": False,
    }
    kwargs.update(overrides)
    if kwargs.get("enable_progress_bar", True):
        kwargs["callbacks"].append(progress_bar())
    return Trainer(**kwargs)
