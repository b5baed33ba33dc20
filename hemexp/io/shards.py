"""Slice shards: one Parquet file per patient, one row per axial slice of the model grid.

Why Parquet rows of fixed-size lists: a training step needs random slices from hundreds of patients;
one file per patient keeps the Snakemake DAG per patient (adding a patient writes one file), and
fixed-size lists let a reader turn a column into an ``[n, H, W]`` array without copying. zstd shrinks
the mostly-zero masks and the skull-stripped CT several-fold; row groups of ``shards.row_group_rows``
rows let a reader decompress only the slices it needs.

Image layout: a slice is stored as ``vol[:, :, z].T`` (row = y / posterior->anterior, column = x /
left->right, row-major), so ``height`` = grid Y, ``width`` = grid X and a horizontal flip of the
image (last axis) is a left-right flip of the head. :func:`slice_image` and :func:`volume_from_slices`
are the only two places that know this.

Schema (docs/architecture.md): ``patient_id, split, site`` str; ``z`` int32; ``z_mm`` float32;
``spacing_mm`` fixed_size_list<float32>[3]; ``height, width`` int32; ``is_target`` bool; ``bl_ct,
fu_ct`` fixed_size_list<float32>[H*W] (HU); ``bl_iph, bl_ivh, fu_iph, fu_ivh``
fixed_size_list<uint8>[H*W]; the 7 clinical columns float32 (raw values); ``expansion`` int8;
``he_prob`` float32 (NaN when absent).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hemexp.core.clinical import CLINICAL_NAMES
from hemexp.core.errors import reading_product
from hemexp.core.files import atomic_path

CT_COLUMNS = ("bl_ct", "fu_ct")
MASK_COLUMNS = ("bl_iph", "bl_ivh", "fu_iph", "fu_ivh")
IMAGE_COLUMNS = (*CT_COLUMNS, *MASK_COLUMNS)
META_COLUMNS = ("patient_id", "split", "site", "z", "z_mm", "spacing_mm", "height", "width", "is_target",
                *CLINICAL_NAMES, "expansion", "he_prob")
SCHEMA_VERSION = "1"
COMPRESSION = "zstd"


def shard_schema(height: int, width: int) -> pa.Schema:
    """The Arrow schema of a shard whose slices are ``height`` x ``width`` pixels."""
    n = int(height) * int(width)
    fields = [
        pa.field("patient_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("site", pa.string()),
        pa.field("z", pa.int32()),
        pa.field("z_mm", pa.float32()),
        pa.field("spacing_mm", pa.list_(pa.float32(), 3)),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("is_target", pa.bool_()),
        *[pa.field(c, pa.list_(pa.float32(), n)) for c in CT_COLUMNS],
        *[pa.field(c, pa.list_(pa.uint8(), n)) for c in MASK_COLUMNS],
        *[pa.field(c, pa.float32()) for c in CLINICAL_NAMES],
        pa.field("expansion", pa.int8()),
        pa.field("he_prob", pa.float32()),
    ]
    return pa.schema(fields, metadata={"hemexp_shard_version": SCHEMA_VERSION})


def slice_image(vol: np.ndarray, z: int) -> np.ndarray:
    """The stored 2D image of axial slice ``z`` of an (x, y, z) volume: shape (Y, X)."""
    return vol[:, :, z].T


def volume_from_slices(images: np.ndarray, zs: np.ndarray | list[int], shape: tuple[int, int, int],
                       fill: float = 0.0, dtype: Any = None) -> np.ndarray:
    """Reassemble an (x, y, z) volume from stored images ``[n, H, W]`` at slice indices ``zs``;
    slices not given are ``fill`` (used by sampling to rebuild 3D outputs on the model grid)."""
    images = np.asarray(images)
    vol = np.full(shape, fill, dtype=dtype or images.dtype)
    for img, z in zip(images, zs, strict=True):
        vol[:, :, int(z)] = img.T
    return vol


def shard_rows(bl_iph: np.ndarray, fu_iph: np.ndarray, spacing_z: float, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(slice indices, is_target) for a shard: the z-range of slices with IPH at baseline or
    follow-up, extended by ``margin_mm`` on both sides (clamped to the grid) for 2.5D context."""
    target = (bl_iph.any(axis=(0, 1)) | fu_iph.any(axis=(0, 1)))
    hits = np.flatnonzero(target)
    if len(hits) == 0:
        raise ValueError("no slice has IPH at baseline or follow-up")
    pad = int(math.floor(margin_mm / spacing_z + 1e-6))
    zs = np.arange(max(0, hits[0] - pad), min(len(target), hits[-1] + pad + 1))
    return zs, target[zs]


def _image_column(vol: np.ndarray, zs: np.ndarray, dtype: Any, n: int) -> pa.FixedSizeListArray:
    flat = np.stack([slice_image(vol, int(z)).astype(dtype).ravel() for z in zs])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), n)


def patient_table(vols: dict[str, np.ndarray], spacing_mm: tuple[float, float, float], z_mm: np.ndarray,
                  meta: dict[str, Any], margin_mm: float) -> pa.Table:
    """Build one patient's shard table from model-grid volumes keyed like :data:`IMAGE_COLUMNS`.

    ``meta`` holds ``patient_id, split, site, expansion, he_prob`` and the clinical variables (raw).
    """
    zs, is_target = shard_rows(vols["bl_iph"], vols["fu_iph"], spacing_mm[2], margin_mm)
    nx, ny, _ = vols["bl_ct"].shape
    height, width, n, rows = ny, nx, nx * ny, len(zs)
    he_prob = meta.get("he_prob")
    columns: dict[str, pa.Array] = {
        "patient_id": pa.array([meta["patient_id"]] * rows, pa.string()),
        "split": pa.array([meta["split"]] * rows, pa.string()),
        "site": pa.array([meta["site"]] * rows, pa.string()),
        "z": pa.array(zs.astype(np.int32)),
        "z_mm": pa.array(np.asarray(z_mm, dtype=np.float32)[zs]),
        "spacing_mm": pa.FixedSizeListArray.from_arrays(
            pa.array(np.tile(np.asarray(spacing_mm, dtype=np.float32), rows)), 3),
        "height": pa.array(np.full(rows, height, np.int32)),
        "width": pa.array(np.full(rows, width, np.int32)),
        "is_target": pa.array(is_target.astype(bool)),
    }
    for col in CT_COLUMNS:
        columns[col] = _image_column(vols[col], zs, np.float32, n)
    for col in MASK_COLUMNS:
        columns[col] = _image_column(vols[col], zs, np.uint8, n)
    for name in CLINICAL_NAMES:
        columns[name] = pa.array(np.full(rows, float(meta[name]), np.float32))
    columns["expansion"] = pa.array(np.full(rows, int(meta["expansion"]), np.int8))
    prob = np.nan if he_prob is None or not np.isfinite(he_prob) else float(he_prob)
    columns["he_prob"] = pa.array(np.full(rows, prob, np.float32))
    schema = shard_schema(height, width)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def write_shard(table: pa.Table, path: str | Path, row_group_rows: int) -> Path:
    """Write a shard atomically: zstd compression, ``row_group_rows`` rows per row group."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=COMPRESSION, row_group_size=max(1, int(row_group_rows)),
                       use_dictionary=["patient_id", "split", "site"], write_statistics=["z", "is_target"])
    return Path(path)


def read_shard(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read (some columns of) a shard through a memory map; a truncated or corrupt shard -> one line
    naming the patient, the file and the stage to rerun (``shard``)."""
    with reading_product(path, "shard", Path(path).stem, what="slice shard"):
        return pq.read_table(str(path), columns=columns, memory_map=True)


def column_images(column: pa.ChunkedArray | pa.Array, height: int, width: int) -> np.ndarray:
    """A fixed-size-list image column as an ``[n, height, width]`` array (no copy for one chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), int(height), int(width))
