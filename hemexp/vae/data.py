"""PyTorch datasets over slice shards: 2D and 2.5D items, split filtering, balanced batches.

Stable API (consumed by the VAE, latent-encoding and diffusion stages)::

    ds = SliceDataset(shard_paths, context=1, step_slices=2, hu_window=(0, 100),
                      splits=("train",), only_targets=False)
    item = ds[i]   # dict, see below
    ds.flags       # int64 [len(ds)] expansion label per item (for BalancedSampler)
    ds.rows        # pandas DataFrame, one row per item: patient_id, split, site, z, is_target, ...
    SliceDataset.from_config(cfg, shard_paths, context=3, splits=("train",), only_targets=True)
    patient_dataset(shard_path, context=1, step_slices=2)   # every row of one shard, z order
    BalancedSampler(ds.flags, batch_size=16, seed=0)

Item dict: ``bl`` float32 [3*context, H, W] — for each context slice in z order (inferior first)
the windowed CT, IPH and IVH, the centre slice being the middle triple; ``fu`` float32 [3, H, W]
(follow-up CT, IPH, IVH of the centre slice); ``clinical`` float32 [7] scaled by
:func:`hemexp.core.clinical.clinical_vector`; ``flag`` int64 (expansion 0/1); ``he_prob`` float32 (NaN when
the manifest has none); ``patient_id`` str; ``z`` int (model-grid slice index). CT is clipped to
``hu_window`` and scaled to [0, 1] here (disk keeps HU); masks are {0, 1}. Image axes are (H, W) =
(y, x), so flipping the last axis is a left-right flip (see :mod:`hemexp.io.shards`).

2.5D neighbours are ``z + k * step_slices`` (k = -(context-1)/2 .. +(context-1)/2) clamped to the
patient's shard rows, which cover the hematoma z-range +/- ``shards.context_margin_mm``.

Reading: the constructor reads only the small metadata columns. Image data is read on first use
per worker process, one Parquet row group at a time through a memory map, and cached for the life
of the worker ("load once per worker"); ``cache_row_groups`` bounds the cache (LRU) when the cohort
does not fit in memory.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler

from hemexp.core.clinical import CLINICAL_NAMES, clinical_vector
from hemexp.core.errors import reading_product
from hemexp.io.shards import IMAGE_COLUMNS, column_images

_INDEX_COLUMNS = ["patient_id", "split", "site", "z", "is_target", "height", "width", "expansion", "he_prob",
                  *CLINICAL_NAMES]


def window_ct(ct_hu: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """HU -> [0, 1] float32 through ``hu_window`` (the paper's input normalisation, clipped outside).

    The VAE's input scaling, defined here with the VAE's training items because the model only knows
    CT through it: sampling (:func:`hemexp.sampling.sampler.slice_stack`) imports this function rather
    than restating it, so inference inputs cannot drift from what the VAE was trained on. Disk keeps HU.
    """
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return np.clip((np.asarray(ct_hu, np.float32) - lo) / (hi - lo), 0.0, 1.0)


def unwindow_ct(ct01: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """The inverse of :func:`window_ct` for decoded CT: [0, 1] -> HU float32, clamped to the window first
    (the VAE never saw values outside it)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return (np.clip(ct01, 0.0, 1.0) * (hi - lo) + lo).astype(np.float32)


def vae_channels(ct_hu: np.ndarray, iph: np.ndarray, ivh: np.ndarray, hu_window: Sequence[float]) -> list[np.ndarray]:
    """The VAE's three input channels of one slice: windowed CT, IPH and IVH as float32 {0, 1}."""
    return [window_ct(ct_hu, hu_window), np.asarray(iph).astype(np.float32), np.asarray(ivh).astype(np.float32)]


def step_slices_from_config(cfg: dict[str, Any]) -> int:
    """2.5D neighbour step in slices: round(shards.context_step_mm / spacing_z), at least 1."""
    return max(1, int(round(cfg["shards"]["context_step_mm"] / cfg["preprocess"]["spacing_mm"][2])))


class _ShardIndex:
    """Metadata of one shard file: z of every row, where row groups start, image size."""

    def __init__(self, path: Path):
        self.path = path
        with reading_product(path, "shard", Path(path).stem, what="slice shard"):
            meta = pq.ParquetFile(str(path), memory_map=True)
            self.group_starts = np.cumsum([0] + [meta.metadata.row_group(i).num_rows
                                                for i in range(meta.num_row_groups)])
            self.frame = pq.read_table(str(path), columns=_INDEX_COLUMNS, memory_map=True).to_pandas()
        self.z = self.frame["z"].to_numpy(np.int64)
        if len(self.z) and np.any(np.diff(self.z) <= 0):
            raise ValueError(f"shard {path}: rows are not in increasing z order")
        self.height = int(self.frame["height"].iloc[0]) if len(self.frame) else 0
        self.width = int(self.frame["width"].iloc[0]) if len(self.frame) else 0

    def row_of(self, z: int) -> int:
        """Row holding slice ``z``, clamped to the shard's z-range (nearest row if z is missing)."""
        z = min(max(int(z), int(self.z[0])), int(self.z[-1]))
        i = int(np.searchsorted(self.z, z))
        if i < len(self.z) and self.z[i] == z:
            return i
        return i - 1 if i == len(self.z) or (i > 0 and z - self.z[i - 1] <= self.z[i] - z) else i

    def group_of(self, row: int) -> tuple[int, int]:
        g = int(np.searchsorted(self.group_starts, row, side="right")) - 1
        return g, row - int(self.group_starts[g])


class SliceDataset(Dataset):
    """Slices from shard files as model-ready tensors (see the module docstring for the item dict)."""

    def __init__(
        self,
        shard_paths: Sequence[str | Path],
        context: int = 1,
        step_slices: int = 1,
        hu_window: tuple[float, float] = (0.0, 100.0),
        splits: Sequence[str] | None = ("train",),
        only_targets: bool = False,
        cache_row_groups: int | None = None,
    ):
        if context < 1 or context % 2 == 0:
            raise ValueError(f"context must be an odd number of slices (1, 3, 5, ...), got {context}")
        if step_slices < 1:
            raise ValueError(f"step_slices must be >= 1, got {step_slices}")
        self.context, self.step, self.hu_window = int(context), int(step_slices), tuple(float(v) for v in hu_window)
        self.shards = [_ShardIndex(Path(p)) for p in shard_paths]
        items = []
        for i, shard in enumerate(self.shards):
            frame = shard.frame.assign(shard=i, row=np.arange(len(shard.frame)))
            if splits is not None:
                frame = frame[frame["split"].isin(list(splits))]
            if only_targets:
                frame = frame[frame["is_target"]]
            items.append(frame)
        self.rows = pd.concat(items, ignore_index=True) if items else pd.DataFrame(columns=[*_INDEX_COLUMNS, "shard", "row"])
        self.flags = self.rows["expansion"].to_numpy(np.int64)
        self._clinical = {i: clinical_vector(s.frame.iloc[0]) for i, s in enumerate(self.shards) if len(s.frame)}
        self._cache: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self._cache_pid = os.getpid()
        self.cache_row_groups = cache_row_groups

    @classmethod
    def from_config(cls, cfg: dict[str, Any], shard_paths: Sequence[str | Path], context: int = 1,
                    splits: Sequence[str] | None = ("train",), only_targets: bool = False, **kwargs: Any) -> SliceDataset:
        """Dataset with step and HU window taken from the config."""
        return cls(shard_paths, context=context, step_slices=step_slices_from_config(cfg),
                   hu_window=tuple(cfg["preprocess"]["hu_window"]), splits=splits, only_targets=only_targets, **kwargs)

    def __len__(self) -> int:
        return len(self.rows)

    def context_rows(self, shard: int, row: int) -> list[int]:
        """Shard rows of the 2.5D context of ``row`` (z order, clamped to the shard's rows)."""
        half = (self.context - 1) // 2
        index = self.shards[shard]
        z = int(index.z[row])
        return [index.row_of(z + k * self.step) for k in range(-half, half + 1)]

    def _group(self, shard: int, group: int) -> dict[str, np.ndarray]:
        """Image arrays of one row group, read once per worker process (LRU-bounded if configured)."""
        if self._cache_pid != os.getpid():  # a forked worker: do not share the parent's half-built cache
            self._cache, self._cache_pid = OrderedDict(), os.getpid()
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        index = self.shards[shard]
        with reading_product(index.path, "shard", Path(index.path).stem, what="slice shard"):
            table = pq.ParquetFile(str(index.path), memory_map=True).read_row_group(group, columns=list(IMAGE_COLUMNS))
        arrays = {c: column_images(table[c], index.height, index.width) for c in IMAGE_COLUMNS}
        self._cache[key] = arrays
        if self.cache_row_groups is not None and len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return arrays

    def _slice(self, shard: int, row: int, column: str) -> np.ndarray:
        group, offset = self.shards[shard].group_of(row)
        return self._group(shard, group)[column][offset]

    def _triple(self, shard: int, row: int, prefix: str) -> list[np.ndarray]:
        return vae_channels(*(self._slice(shard, row, f"{prefix}_{k}") for k in ("ct", "iph", "ivh")), self.hu_window)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.rows.iloc[int(i)]
        shard, row = int(item["shard"]), int(item["row"])
        bl = [ch for r in self.context_rows(shard, row) for ch in self._triple(shard, r, "bl")]
        return {
            "bl": torch.from_numpy(np.stack(bl)),
            "fu": torch.from_numpy(np.stack(self._triple(shard, row, "fu"))),
            "clinical": torch.from_numpy(self._clinical[shard].copy()),
            "flag": torch.tensor(int(item["expansion"]), dtype=torch.int64),
            "he_prob": torch.tensor(float(item["he_prob"]), dtype=torch.float32),
            "patient_id": str(item["patient_id"]),
            "z": int(item["z"]),
        }


def patient_dataset(shard_path: str | Path, context: int = 1, step_slices: int = 1,
                    hu_window: tuple[float, float] = (0.0, 100.0)) -> SliceDataset:
    """Every row of one patient's shard (any split, targets and context rows), in z order: what
    latent encoding and sampling iterate over."""
    return SliceDataset([shard_path], context=context, step_slices=step_slices, hu_window=hu_window,
                        splits=None, only_targets=False)


class BalancedSampler(Sampler[int]):
    """Indices in batches of ``batch_size`` holding equally many expansion (label 1) and
    non-expansion (label 0) items, in random order within each batch (paper: balanced batches).

    Each class is drawn without replacement from a fresh permutation, repeated when exhausted (the
    minority class is oversampled). ``num_batches`` defaults to ceil(len(labels) / batch_size).
    The order depends only on ``seed`` and the epoch (``set_epoch``, advanced by each iteration),
    so a resumed run can reproduce it. Use with ``DataLoader(ds, batch_size=batch_size, sampler=...)``.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, batch_size: int, num_batches: int | None = None,
                 seed: int = 0):
        labels = np.asarray(labels).astype(np.int64)
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size must be even and >= 2 for balanced batches, got {batch_size}")
        self.pos, self.neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        if len(self.pos) == 0 or len(self.neg) == 0:
            raise ValueError(f"balanced batches need both classes: {len(self.pos)} expansion, "
                             f"{len(self.neg)} non-expansion items")
        self.batch_size, self.seed, self.epoch = int(batch_size), int(seed), 0
        self.num_batches = num_batches if num_batches is not None else math.ceil(len(labels) / batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    @staticmethod
    def _stream(pool: np.ndarray, rng: np.random.Generator) -> Iterator[int]:
        while True:
            yield from rng.permutation(pool).tolist()

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        pos, neg, half = self._stream(self.pos, rng), self._stream(self.neg, rng), self.batch_size // 2
        for _ in range(self.num_batches):
            batch = [next(pos) for _ in range(half)] + [next(neg) for _ in range(half)]
            yield from rng.permutation(batch).tolist()
