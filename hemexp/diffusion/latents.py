"""Latent cache: every shard slice of a patient encoded by the frozen VAE, plus normalisation stats.

Why a cache: diffusion trains for tens of thousands of steps on the same slices; encoding them once
(posterior mean, deterministic) turns each step into a tensor lookup and lets Snakemake re-encode only
the patients whose shard or the VAE changed (one ``results/latents/{p}.npz`` per patient).

File format (``np.savez``, no pickles): ``z_bl``, ``z_fu`` float32 ``[N, C, h, w]`` (rows sorted by
``z``); ``z_bl_flip``, ``z_fu_flip`` the same for the left-right mirrored slices; ``z`` int32 ``[N]``
model-grid slice index, ``z_mm`` float32 ``[N]``, ``is_target`` bool ``[N]``,
``clinical`` float32 ``[7]`` (clamped and scaled, :func:`hemexp.core.clinical.clinical_vector`),
``clinical_raw`` float32 ``[7]``, ``flag`` int8 (expansion label), ``he_prob`` float32 (NaN if absent),
``spacing_mm`` float32 ``[3]``, ``patient_id``/``split``/``site`` str, ``iph_bl_cells`` float32
``[N, h, w]`` the share of each latent cell's pixels inside the baseline IPH mask (training's lesion
weighting, :mod:`hemexp.diffusion.lesion`; mirroring it is exact, since the grid pools whole cells).

Why mirrored encodings: the diffusion stage augments with horizontal flips, and mirroring a latent
grid is *not* the latent of the mirrored slice — latent channels encode oriented features. Measured on
the demo VAE: ``||enc(flip x) - flip(enc x)||`` is 98 % of ``||enc x||`` (normalised units), and
decoding ``flip(enc x)`` drops IPH Dice against the mirrored mask from 0.89 to 0.64. Encoding the
mirrored slice as well costs one more encoder pass and makes the augmentation exact.

Normalisation (paper §2.4, after Rombach et al.): channel-wise z-score with mean/std over every
cached slice (baseline and follow-up, targets and context) of the **training** patients only, so a
test patient can never leak into the model. :func:`normalise` / :func:`denormalise` work on NumPy
arrays and torch tensors with the channel axis third from the end (``[..., C, h, w]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hemexp.core.clinical import CLINICAL_NAMES, clinical_vector
from hemexp.core.errors import PatientInputError, reading_product
from hemexp.core.files import atomic_path, write_json
from hemexp.io.shards import read_shard
from hemexp.vae.data import patient_dataset

ARRAY_KEYS = ("z_bl", "z_fu", "z_bl_flip", "z_fu_flip", "z", "z_mm", "is_target", "clinical", "clinical_raw",
              "flag", "he_prob", "spacing_mm", "patient_id", "split", "site", "iph_bl_cells")


@dataclass(frozen=True)
class PatientLatents:
    """One patient's cached latents (see module docstring for the fields)."""

    patient_id: str
    split: str
    site: str
    z_bl: np.ndarray
    z_fu: np.ndarray
    z_bl_flip: np.ndarray
    z_fu_flip: np.ndarray
    z: np.ndarray
    z_mm: np.ndarray
    is_target: np.ndarray
    clinical: np.ndarray
    clinical_raw: np.ndarray
    flag: int
    he_prob: float
    spacing_mm: np.ndarray
    iph_bl_cells: np.ndarray

    @property
    def target_rows(self) -> np.ndarray:
        """Row indices of 2D target slices (slices with IPH at baseline or follow-up)."""
        return np.flatnonzero(self.is_target)

    def context_rows(self, row: int, context: int, step: int) -> np.ndarray:
        """Rows of the ``context`` slices centred on ``row`` at ``step`` slices, in z order.

        A neighbour outside the cached z-range (the shard covers the hematoma extent ± the context
        margin) is replaced by the nearest cached slice (edge replication), exactly as
        :meth:`hemexp.vae.data.SliceDataset.context_rows` does for images.
        """
        if context < 1 or context % 2 == 0:
            raise ValueError(f"context must be an odd number of slices, got {context}")
        half = context // 2
        wanted = self.z[row] + step * np.arange(-half, half + 1)
        pos = np.clip(np.searchsorted(self.z, wanted), 0, len(self.z) - 1)
        prev = np.clip(pos - 1, 0, len(self.z) - 1)
        nearer_prev = np.abs(self.z[prev] - wanted) <= np.abs(self.z[pos] - wanted)  # ties: lower z, as hemexp.vae.data
        return np.where(nearer_prev, prev, pos)


# ----------------------------------------------------------------------------- encoding


def encode_patient(shard_path: str | Path, vae: Any, hu_window: tuple[float, float], batch_size: int,
                   device: Any = "cpu") -> dict[str, np.ndarray]:
    """Encode every row (targets and context) of one shard, baseline and follow-up -> cache arrays.

    Slices are read and windowed by :func:`hemexp.vae.data.patient_dataset` (the VAE's own input path);
    raises :class:`PatientInputError` for an empty shard, a slice size the VAE cannot take, or an
    expansion label that is not one 0/1 value.
    """

    ds = patient_dataset(shard_path, context=1, hu_window=hu_window)
    pid = Path(shard_path).stem
    if len(ds) == 0:
        raise PatientInputError(pid, shard_path, "shard has no rows")
    rows = ds.rows
    pid = str(rows["patient_id"].iloc[0])
    flags = np.unique(rows["expansion"].to_numpy())
    if len(flags) != 1 or int(flags[0]) not in (0, 1):
        raise PatientInputError(pid, shard_path, f"expansion column must be one 0/1 value, got {flags.tolist()}")
    factor = int(getattr(vae, "downsample_factor", 1))
    if ds.shards[0].height % factor or ds.shards[0].width % factor:
        raise PatientInputError(pid, shard_path, f"slice size {ds.shards[0].height}x{ds.shards[0].width} "
                                                 f"is not divisible by the VAE's downsampling factor {factor}")
    z_bl, z_fu, z_bl_flip, z_fu_flip, iph_bl_cells = _encode_dataset(vae, ds, batch_size, device, factor)
    extra = read_shard(shard_path, columns=["z_mm", "spacing_mm"])
    raw = {name: float(rows[name].iloc[0]) for name in CLINICAL_NAMES}
    return {
        "z_bl": z_bl,
        "z_fu": z_fu,
        "z_bl_flip": z_bl_flip,
        "z_fu_flip": z_fu_flip,
        "z": rows["z"].to_numpy(np.int32),
        "z_mm": extra.column("z_mm").to_numpy().astype(np.float32),
        "is_target": rows["is_target"].to_numpy(bool),
        "clinical": clinical_vector(raw),
        "clinical_raw": np.array([raw[n] for n in CLINICAL_NAMES], dtype=np.float32),
        "flag": np.int8(flags[0]),
        "he_prob": np.float32(rows["he_prob"].iloc[0]),
        "spacing_mm": np.asarray(extra.column("spacing_mm")[0].as_py(), dtype=np.float32),
        "patient_id": np.str_(pid),
        "split": np.str_(rows["split"].iloc[0]),
        "site": np.str_(rows["site"].iloc[0]),
        "iph_bl_cells": iph_bl_cells,
    }


def _encode_dataset(vae: Any, ds: Any, batch_size: int, device: Any, factor: int) -> tuple[np.ndarray, ...]:
    """Posterior means of every item's baseline and follow-up slice, as stored and left-right mirrored
    (last image axis, see :mod:`hemexp.io.shards`): four float32 ``[N, C, h, w]`` arrays; then the
    baseline IPH mask (channel 1 of the slice triple) average-pooled onto the latent grid ``[N, h, w]``."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    out: dict[tuple[str, bool], list[np.ndarray]] = {(k, f): [] for f in (False, True) for k in ("bl", "fu")}
    cells: list[np.ndarray] = []
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    with torch.inference_mode():
        for batch in loader:
            for key, flip in out:
                x = batch[key].to(device)
                out[key, flip].append(vae.encode_mean(x.flip(-1) if flip else x).float().cpu().numpy())
            iph = (batch["bl"][:, 1:2].float() > 0.5).float()
            cells.append(F.avg_pool2d(iph, factor)[:, 0].numpy())
    latents = tuple(np.concatenate(out[k]) for k in (("bl", False), ("fu", False), ("bl", True), ("fu", True)))
    return (*latents, np.concatenate(cells).astype(np.float32))


def save_latents(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one patient's cache atomically (uncompressed: latents are dense floats)."""
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"latent cache lacks {missing}")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: arrays[k] for k in ARRAY_KEYS})


def load_latents(path: str | Path) -> PatientLatents:
    """Read a cache written by :func:`save_latents`; a truncated or corrupt cache -> one line naming the
    patient, the file and the stage to rerun (``encode``)."""
    with reading_product(path, "encode", Path(path).stem, what="latent cache"):
        with np.load(path, allow_pickle=False) as data:
            d = {k: data[k] for k in ARRAY_KEYS}
    return PatientLatents(
        patient_id=str(d["patient_id"]), split=str(d["split"]), site=str(d["site"]),
        z_bl=d["z_bl"], z_fu=d["z_fu"], z_bl_flip=d["z_bl_flip"], z_fu_flip=d["z_fu_flip"],
        z=d["z"], z_mm=d["z_mm"], is_target=d["is_target"],
        clinical=d["clinical"], clinical_raw=d["clinical_raw"], flag=int(d["flag"]),
        he_prob=float(d["he_prob"]), spacing_mm=d["spacing_mm"], iph_bl_cells=d["iph_bl_cells"],
    )


# ----------------------------------------------------------------------------- statistics


def compute_stats(latents: Iterable[PatientLatents], splits: tuple[str, ...] = ("train",)) -> dict[str, Any]:
    """Channel-wise mean/std over all cached slices (baseline + follow-up) of patients in ``splits``.

    The mirrored encodings are left out: the statistics describe the latents sampling sees.

    Accumulated in float64 sums so thousands of patients stream through in constant memory.
    Patients of other splits are skipped (and listed), never averaged in.
    """
    total = sq = None
    count = 0
    used, skipped = [], []
    for lat in latents:
        if lat.split not in splits:
            skipped.append(lat.patient_id)
            continue
        both = np.concatenate([lat.z_bl, lat.z_fu]).astype(np.float64)
        s, s2 = both.sum(axis=(0, 2, 3)), (both**2).sum(axis=(0, 2, 3))
        total, sq = (s, s2) if total is None else (total + s, sq + s2)
        count += both.shape[0] * both.shape[2] * both.shape[3]
        used.append(lat.patient_id)
    if not used:
        raise ValueError(f"no patient of split(s) {splits} to compute latent statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    if not np.all(std > 0) or not np.all(np.isfinite(std)):
        raise ValueError(f"degenerate latent channel std {std.tolist()}")
    return {"mean": mean.tolist(), "std": std.tolist(), "n_values_per_channel": int(count),
            "splits": list(splits), "patients": sorted(used), "skipped": sorted(skipped)}


def write_stats(path: str | Path, stats: dict[str, Any]) -> None:
    write_json(path, stats)


def _channel_view(stats: dict[str, Any], like: Any) -> tuple[Any, Any]:
    mean = np.asarray(stats["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(stats["std"], dtype=np.float32)[:, None, None]
    if isinstance(like, np.ndarray):
        return mean, std
    import torch

    return (torch.as_tensor(mean, dtype=like.dtype, device=like.device),
            torch.as_tensor(std, dtype=like.dtype, device=like.device))


def normalise(z: Any, stats: dict[str, Any]) -> Any:
    """Channel-wise z-score ``(z - mean) / std``; ``z`` is ``[..., C, h, w]`` (NumPy or torch)."""
    mean, std = _channel_view(stats, z)
    return (z - mean) / std


def denormalise(z: Any, stats: dict[str, Any]) -> Any:
    """Inverse of :func:`normalise` (before decoding with the VAE)."""
    mean, std = _channel_view(stats, z)
    return z * std + mean


def check_stats(stats: dict[str, Any], channels: int) -> None:
    """Fail early when stats and latents disagree on the channel count."""
    if len(stats["mean"]) != channels or len(stats["std"]) != channels:
        raise ValueError(f"latent stats have {len(stats['mean'])} channels, latents {channels}")
    if not all(math.isfinite(s) and s > 0 for s in stats["std"]):
        raise ValueError("latent stats have a non-positive std")
