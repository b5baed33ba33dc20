"""Slice shards: write -> read returns the arrays exactly; rows = target slices + context margin; schema."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hemexp.core.clinical import CLINICAL_NAMES
from hemexp.io.shards import (
    IMAGE_COLUMNS,
    column_images,
    patient_table,
    read_shard,
    shard_rows,
    slice_image,
    volume_from_slices,
    write_shard,
)

SHAPE = (12, 10, 20)  # X, Y, Z: non-square so a transposed image would be caught
SPACING = (3.0, 3.0, 3.0)


def make_volumes(seed: int = 0, bl_z=(8, 10), fu_z=(9, 12)) -> dict[str, np.ndarray]:
    """Random model-grid volumes; IPH at baseline on ``bl_z`` slices, follow-up on ``fu_z``."""
    rng = np.random.default_rng(seed)
    vols = {c: rng.normal(40, 20, SHAPE).astype(np.float32) for c in ("bl_ct", "fu_ct")}
    for c in ("bl_iph", "bl_ivh", "fu_iph", "fu_ivh"):
        vols[c] = np.zeros(SHAPE, np.uint8)
    vols["bl_iph"][3:6, 2:5, bl_z[0]:bl_z[1] + 1] = 1
    vols["fu_iph"][3:7, 2:6, fu_z[0]:fu_z[1] + 1] = 1
    vols["fu_ivh"][8:10, 1:3, 11] = 1
    return vols


def make_meta(pid: str = "P1", split: str = "train", expansion: int = 1, he_prob: float | None = None) -> dict:
    clinical = dict(zip(CLINICAL_NAMES, [3.0, 12.5, 1, 0, 71, 13, 180], strict=True))
    return {"patient_id": pid, "split": split, "site": "A", "expansion": expansion, "he_prob": he_prob, **clinical}


def write_patient(path, vols=None, margin_mm: float = 6.0, row_group_rows: int = 4, **meta):
    vols = vols if vols is not None else make_volumes()
    z_mm = np.arange(SHAPE[2], dtype=np.float32) * SPACING[2] - 30.0
    return write_shard(patient_table(vols, SPACING, z_mm, make_meta(**meta), margin_mm), path, row_group_rows)


def test_rows_cover_targets_plus_margin():
    vols = make_volumes()
    zs, target = shard_rows(vols["bl_iph"], vols["fu_iph"], spacing_z=3.0, margin_mm=6.0)
    assert zs.tolist() == list(range(6, 15))  # IPH on 8..12, +/- 2 slices
    assert target.tolist() == [False, False, True, True, True, True, True, False, False]
    zs, _ = shard_rows(vols["bl_iph"], vols["fu_iph"], spacing_z=3.0, margin_mm=100.0)
    assert zs[0] == 0 and zs[-1] == SHAPE[2] - 1  # clamped to the grid
    with pytest.raises(ValueError, match="no slice has IPH"):
        shard_rows(np.zeros(SHAPE), np.zeros(SHAPE), 3.0, 6.0)


def test_round_trip_equals_arrays(tmp_path):
    vols = make_volumes()
    path = write_patient(tmp_path / "P1.parquet", vols, he_prob=0.25)
    table = read_shard(path)
    assert table.num_rows == 9 and table["z"].to_pylist() == list(range(6, 15))
    h, w = table["height"][0].as_py(), table["width"][0].as_py()
    assert (h, w) == (SHAPE[1], SHAPE[0])
    for col in IMAGE_COLUMNS:
        images = column_images(table[col], h, w)
        assert images.dtype == vols[col].dtype
        for img, z in zip(images, table["z"].to_pylist(), strict=True):
            np.testing.assert_array_equal(img, slice_image(vols[col], z))
        back = volume_from_slices(images, table["z"].to_numpy(), SHAPE)
        np.testing.assert_array_equal(back[:, :, 6:15], vols[col][:, :, 6:15])
    assert table["he_prob"][0].as_py() == pytest.approx(0.25)
    assert table["gcs"][0].as_py() == 13 and table["expansion"][0].as_py() == 1
    assert table["spacing_mm"][0].as_py() == list(SPACING)
    assert table["z_mm"].to_pylist()[0] == pytest.approx(6 * 3.0 - 30.0)


def test_schema_compression_and_row_groups(tmp_path):
    path = write_patient(tmp_path / "P1.parquet", row_group_rows=4)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3  # 9 rows in groups of 4
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}
    schema = read_shard(path).schema
    n = SHAPE[0] * SHAPE[1]
    assert schema.field("bl_ct").type == pa.list_(pa.float32(), n)
    assert schema.field("fu_iph").type == pa.list_(pa.uint8(), n)
    assert schema.field("z").type == pa.int32() and schema.field("expansion").type == pa.int8()
    assert schema.field("is_target").type == pa.bool_()
    no_prob = read_shard(write_patient(tmp_path / "P2.parquet"), columns=["he_prob"])
    assert np.isnan(no_prob["he_prob"][0].as_py())
