"""SliceDataset (2D / 2.5D items, context indexing and clamping, split and target filters, windowing)
and BalancedSampler (both classes, equal per batch, seeded)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from test_shards import SHAPE, make_volumes, write_patient
from torch.utils.data import DataLoader

from hemexp.core.clinical import clinical_vector
from hemexp.io.shards import slice_image
from hemexp.vae.data import BalancedSampler, SliceDataset, patient_dataset, step_slices_from_config

H, W = SHAPE[1], SHAPE[0]


@pytest.fixture
def shards(tmp_path):
    """Three patients: P1 expands (train), P2 does not (train), P3 test split."""
    vols = {"P1": make_volumes(1), "P2": make_volumes(2, bl_z=(5, 6), fu_z=(5, 6)), "P3": make_volumes(3)}
    paths = [
        write_patient(tmp_path / "P1.parquet", vols["P1"], pid="P1", expansion=1),
        write_patient(tmp_path / "P2.parquet", vols["P2"], pid="P2", expansion=0),
        write_patient(tmp_path / "P3.parquet", vols["P3"], pid="P3", expansion=0, split="test"),
    ]
    return paths, vols


def _window(ct):
    return np.clip(ct / 100.0, 0, 1)


def test_2d_items(shards):
    paths, vols = shards
    ds = SliceDataset(paths, context=1, hu_window=(0, 100))
    assert set(ds.rows["patient_id"]) == {"P1", "P2"}  # train split only
    item = ds[0]
    assert item["bl"].shape == (3, H, W) and item["fu"].shape == (3, H, W) and item["bl"].dtype == torch.float32
    pid, z = item["patient_id"], item["z"]
    np.testing.assert_allclose(item["bl"][0].numpy(), _window(slice_image(vols[pid]["bl_ct"], z)), atol=1e-6)
    np.testing.assert_array_equal(item["bl"][1].numpy(), slice_image(vols[pid]["bl_iph"], z))
    np.testing.assert_array_equal(item["fu"][2].numpy(), slice_image(vols[pid]["fu_ivh"], z))
    assert 0.0 <= item["bl"][0].min() and item["bl"][0].max() <= 1.0
    assert item["clinical"].shape == (7,) and torch.all((item["clinical"] >= 0) & (item["clinical"] <= 1))
    np.testing.assert_allclose(item["clinical"].numpy(), clinical_vector(ds.rows.iloc[0]), atol=1e-6)
    assert item["flag"].dtype == torch.int64 and int(item["flag"]) == 1 and torch.isnan(item["he_prob"])


def test_25d_context_and_clamping(shards):
    paths, vols = shards
    ds = SliceDataset(paths, context=5, step_slices=2, splits=("train",))
    d2 = SliceDataset(paths, context=1, splits=("train",))
    rows = ds.rows.reset_index(drop=True)
    first = int(np.flatnonzero(rows["patient_id"] == "P1")[0])  # P1 rows: z 6..14
    item = ds[first]
    assert item["bl"].shape == (15, H, W) and item["z"] == 6
    # context z = 2, 4, 6, 8, 10 clamped to the shard's rows 6..14 -> 6, 6, 6, 8, 10
    for k, z in enumerate([6, 6, 6, 8, 10]):
        np.testing.assert_array_equal(item["bl"][3 * k + 1].numpy(), slice_image(vols["P1"]["bl_iph"], z))
    np.testing.assert_array_equal(item["bl"][6:9].numpy(), d2[first]["bl"].numpy())  # centre triple = 2D item
    last = int(np.flatnonzero(rows["patient_id"] == "P1")[-1])
    assert ds.context_rows(0, int(rows.loc[last, "row"])) == [4, 6, 8, 8, 8]  # z 10, 12, 14, 16->14, 18->14


def test_filters_and_patient_iteration(shards):
    paths, _ = shards
    targets = SliceDataset(paths, splits=("train", "test"), only_targets=True)
    assert targets.rows["is_target"].all() and set(targets.rows["patient_id"]) == {"P1", "P2", "P3"}
    assert len(SliceDataset(paths, splits=("test",))) == 9
    one = patient_dataset(paths[2])
    assert [one[i]["z"] for i in range(len(one))] == list(range(6, 15)) and one[0]["patient_id"] == "P3"
    with pytest.raises(ValueError, match="odd"):
        SliceDataset(paths, context=2)
    cfg = {"shards": {"context_step_mm": 5.0}, "preprocess": {"spacing_mm": [0.5, 0.5, 1.0]}}
    assert step_slices_from_config(cfg) == 5


def test_dataloader_with_worker(shards):
    paths, _ = shards
    ds = SliceDataset(paths, context=3, step_slices=1, cache_row_groups=2)
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=1)))
    assert batch["bl"].shape == (4, 9, H, W) and len(batch["patient_id"]) == 4 and batch["flag"].shape == (4,)


def test_balanced_sampler(shards):
    paths, _ = shards
    ds = SliceDataset(paths)
    labels = ds.flags
    assert Counter(labels.tolist()) == {1: 9, 0: 6}
    sampler = BalancedSampler(labels, batch_size=4, num_batches=10, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 40
    for b in range(10):
        batch = order[4 * b: 4 * b + 4]
        assert sorted(labels[batch].tolist()) == [0, 0, 1, 1]
    assert order == list(BalancedSampler(labels, batch_size=4, num_batches=10, seed=3))  # seeded
    assert list(sampler) != order  # next epoch differs
    sampler.set_epoch(0)
    assert list(sampler) == order
    with pytest.raises(ValueError, match="both classes"):
        BalancedSampler(np.zeros(8), batch_size=4)
    batch = next(iter(DataLoader(ds, batch_size=4, sampler=BalancedSampler(labels, batch_size=4, seed=0))))
    assert sorted(batch["flag"].tolist()) == [0, 0, 1, 1]
