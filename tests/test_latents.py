"""Latent cache: encoding every shard row, the file format, train-only statistics, normalisation,
2.5D context rows, and the ``hemexp encode`` / ``latent-stats`` commands.

Shards are built with the real shard writer from tiny synthetic volumes; the VAE is a tiny, randomly
initialised :class:`hemexp.vae.model.MultiHeadVAE` (encoding is deterministic, training is not needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hemexp.core.clinical import clinical_vector
from hemexp.core.config import load_config
from hemexp.core.layout import Layout
from hemexp.diffusion.latents import (
    PatientLatents,
    compute_stats,
    denormalise,
    encode_patient,
    load_latents,
    normalise,
    save_latents,
)
from hemexp.io.shards import patient_table, write_shard
from hemexp.vae.data import patient_dataset
from hemexp.vae.model import MultiHeadVAE

HU_WINDOW = (0.0, 100.0)
CLINICAL = {"onset_to_ct_h": 2.0, "baseline_iph_ml": 12.0, "anticoagulant": 1.0, "antiplatelet": 0.0,
            "age": 71.0, "gcs": 13.0, "sbp": 185.0}


def tiny_vae(seed: int = 0) -> MultiHeadVAE:
    torch.manual_seed(seed)
    return MultiHeadVAE(channels=(8, 8), num_res_blocks=1, latent_channels=4, norm_num_groups=4).eval()


def make_shard(path: Path, pid: str, split: str = "train", expansion: int = 0, seed: int = 0,
               size: int = 16, depth: int = 10) -> Path:
    """A real shard of one synthetic patient: IPH on slices 4-5 (baseline), 3-6 when expanding."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(40, 15, (size, size, depth)).astype(np.float32)
    bl = np.zeros((size, size, depth), np.uint8)
    bl[5:9, 6:10, 4:6] = 1
    fu = bl.copy()
    if expansion:
        fu[4:11, 5:12, 3:7] = 1
    vols = {"bl_ct": ct, "fu_ct": ct + 10 * fu, "bl_iph": bl, "bl_ivh": np.zeros_like(bl), "fu_iph": fu,
            "fu_ivh": np.zeros_like(bl)}
    meta = {"patient_id": pid, "split": split, "site": "A" if split == "train" else "D",
            "expansion": expansion, "he_prob": 0.25, **CLINICAL}
    table = patient_table(vols, (3.0, 3.0, 3.0), np.arange(depth) * 3.0, meta, margin_mm=6.0)
    return write_shard(table, path, row_group_rows=4)


def fake_latents(pid: str, split: str, offset: float = 0.0, n: int = 6, flag: int = 0, seed: int = 0) -> PatientLatents:
    rng = np.random.default_rng(seed)
    shape = (n, 4, 4, 4)
    z_bl, z_fu = ((rng.normal(size=shape) + offset).astype(np.float32) for _ in range(2))
    return PatientLatents(
        patient_id=pid, split=split, site="A", z_bl=z_bl, z_fu=z_fu,
        z_bl_flip=np.ascontiguousarray(z_bl[..., ::-1]), z_fu_flip=np.ascontiguousarray(z_fu[..., ::-1]),
        z=np.arange(10, 10 + n, dtype=np.int32), z_mm=np.arange(n, dtype=np.float32) * 3,
        is_target=np.array([False, True, True, True, True, False][:n] + [False] * max(0, n - 6)),
        clinical=clinical_vector(CLINICAL), clinical_raw=np.array(list(CLINICAL.values()), np.float32),
        flag=flag, he_prob=float("nan"), spacing_mm=np.array([3, 3, 3], np.float32),
        iph_bl_cells=(rng.random((n, 4, 4)) < 0.3).astype(np.float32),
    )


def as_arrays(lat: PatientLatents) -> dict[str, np.ndarray]:
    return {"z_bl": lat.z_bl, "z_fu": lat.z_fu, "z_bl_flip": lat.z_bl_flip, "z_fu_flip": lat.z_fu_flip, "z": lat.z, "z_mm": lat.z_mm, "is_target": lat.is_target,
            "clinical": lat.clinical, "clinical_raw": lat.clinical_raw, "flag": np.int8(lat.flag),
            "he_prob": np.float32(lat.he_prob), "spacing_mm": lat.spacing_mm, "patient_id": np.str_(lat.patient_id),
            "split": np.str_(lat.split), "site": np.str_(lat.site), "iph_bl_cells": lat.iph_bl_cells}


def test_encode_patient_encodes_every_row_with_the_posterior_mean(tmp_path):
    shard = make_shard(tmp_path / "P1.parquet", "P1", expansion=1)
    vae = tiny_vae()
    arrays = encode_patient(shard, vae, HU_WINDOW, batch_size=3)
    ds = patient_dataset(shard, hu_window=HU_WINDOW)
    n = len(ds)
    assert n == 8  # IPH on z 3..6, +- 2 context slices (6 mm margin at 3 mm): z 1..8
    assert arrays["z_bl"].shape == arrays["z_fu"].shape == (n, 4, 8, 8)
    assert arrays["z_bl"].dtype == np.float32
    np.testing.assert_array_equal(arrays["z"], np.arange(1, 9))
    np.testing.assert_array_equal(arrays["is_target"], ds.rows["is_target"].to_numpy())
    assert arrays["is_target"].sum() == 4 and not arrays["is_target"][[0, 1, -2, -1]].any()
    with torch.no_grad():  # row 5's follow-up, encoded alone, matches the batched cache
        expected = vae.encode_mean(ds[5]["fu"][None]).numpy()[0]
        mirrored = vae.encode_mean(ds[5]["bl"][None].flip(-1)).numpy()[0]
    np.testing.assert_allclose(arrays["z_fu"][5], expected, atol=1e-5)
    np.testing.assert_allclose(arrays["z_bl_flip"][5], mirrored, atol=1e-5)  # encoding of the mirrored slice
    assert arrays["z_bl_flip"].shape == arrays["z_fu_flip"].shape == arrays["z_bl"].shape
    assert not np.allclose(arrays["z_bl"], arrays["z_fu"])  # the follow-up differs where IPH grew
    np.testing.assert_allclose(arrays["clinical"], clinical_vector(CLINICAL))
    assert int(arrays["flag"]) == 1 and str(arrays["split"]) == "train" and str(arrays["patient_id"]) == "P1"
    np.testing.assert_allclose(arrays["he_prob"], 0.25)


def test_encode_patient_pools_the_baseline_iph_mask_onto_the_latent_grid(tmp_path):
    """iph_bl_cells = the share of each latent cell's 2x2 pixels in the baseline IPH mask: the 4x4-pixel
    baseline hematoma of z 4-5 covers 16 pixels = 4 cells' worth; slices without baseline IPH are 0."""
    shard = make_shard(tmp_path / "P1.parquet", "P1", expansion=1)
    arrays = encode_patient(shard, tiny_vae(), HU_WINDOW, batch_size=3)
    ds = patient_dataset(shard, hu_window=HU_WINDOW)
    cells = arrays["iph_bl_cells"]
    assert cells.shape == (len(ds), 8, 8) and cells.dtype == np.float32
    for row, z in enumerate(arrays["z"]):
        mask = ds[row]["bl"][1].numpy() > 0.5
        np.testing.assert_allclose(cells[row], mask.reshape(8, 2, 8, 2).mean(axis=(1, 3)))
        assert cells[row].sum() * 4 == pytest.approx(16.0 if z in (4, 5) else 0.0)
    assert set(np.unique(cells[arrays["z"] == 4])) <= {0.0, 0.5, 1.0}  # rows 5..8 of 16 px straddle cells


def test_cache_file_roundtrip(tmp_path):
    lat = fake_latents("P2", "test", flag=1)
    save_latents(tmp_path / "P2.npz", as_arrays(lat))
    back = load_latents(tmp_path / "P2.npz")
    np.testing.assert_array_equal(back.z_fu, lat.z_fu)
    np.testing.assert_array_equal(back.is_target, lat.is_target)
    np.testing.assert_array_equal(back.iph_bl_cells, lat.iph_bl_cells)
    assert (back.patient_id, back.split, back.flag) == ("P2", "test", 1)
    assert np.isnan(back.he_prob)
    assert [p.name for p in tmp_path.iterdir()] == ["P2.npz"]  # atomic write left no temp file


def test_stats_use_the_training_split_only():
    train = [fake_latents(f"T{i}", "train", seed=i) for i in range(3)]
    huge_test = fake_latents("X1", "test", offset=1e4, seed=9)
    stats = compute_stats(train)
    with_test = compute_stats([*train, huge_test])
    np.testing.assert_allclose(with_test["mean"], stats["mean"])
    np.testing.assert_allclose(with_test["std"], stats["std"])
    assert with_test["skipped"] == ["X1"] and with_test["patients"] == ["T0", "T1", "T2"]
    both = np.concatenate([np.concatenate([p.z_bl, p.z_fu]) for p in train]).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], both.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["std"], both.std(axis=(0, 2, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="no patient"):
        compute_stats([huge_test])


def test_normalise_is_a_channelwise_zscore_and_denormalise_inverts_it():
    lat = fake_latents("T0", "train", offset=3.0)
    stats = compute_stats([lat])
    z = normalise(np.concatenate([lat.z_bl, lat.z_fu]), stats)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1.0, atol=1e-5)
    t = torch.from_numpy(lat.z_bl)
    back = denormalise(normalise(t, stats), stats)
    assert isinstance(back, torch.Tensor)
    torch.testing.assert_close(back, t, atol=1e-5, rtol=1e-5)
    stacked = normalise(lat.z_bl[0][None, None], stats)  # extra leading axes broadcast too
    np.testing.assert_allclose(stacked[0, 0], normalise(lat.z_bl[0], stats), atol=1e-6)


def test_context_rows_step_and_edge_replication_match_the_image_dataset(tmp_path):
    shard = make_shard(tmp_path / "P3.parquet", "P3", expansion=1)
    arrays = encode_patient(shard, tiny_vae(), HU_WINDOW, batch_size=8)
    save_latents(tmp_path / "P3.npz", arrays)
    lat = load_latents(tmp_path / "P3.npz")
    for context, step in ((1, 2), (3, 2), (5, 2), (3, 1)):
        images = patient_dataset(shard, context=context, step_slices=step, hu_window=HU_WINDOW)
        for row in range(len(lat.z)):
            assert lat.context_rows(row, context, step).tolist() == images.context_rows(0, row), (context, step, row)
    centre = int(np.flatnonzero(lat.z == 4)[0])
    assert lat.z[lat.context_rows(centre, 5, 2)].tolist() == [1, 2, 4, 6, 8]  # z=0 is not cached: nearest is 1
    with pytest.raises(ValueError, match="odd"):
        lat.context_rows(0, 2, 1)


def _cli_config(tmp_path: Path) -> tuple[dict, Path]:
    cfg = load_config(None)
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["cohort"]["synthetic"]["sites"] = {"A": 2, "D": 1}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


def test_encode_and_latent_stats_commands(tmp_path):
    from hemexp.cli import main

    cfg, cfg_path = _cli_config(tmp_path)
    tiny_vae().save(Layout.of(cfg).vae_model)
    shards = Path(cfg["results_dir"]) / "shards"
    for i, (pid, split) in enumerate((("A001", "train"), ("A002", "train"), ("D001", "test"))):
        make_shard(shards / f"{pid}.parquet", pid, split=split, expansion=i % 2, seed=i)
    for pid in ("A001", "A002", "D001"):
        assert main(["encode", pid, "--config", str(cfg_path)]) == 0
        assert Layout.of(cfg).latents(pid).exists()
    assert main(["latent-stats", "--config", str(cfg_path)]) == 0
    stats = yaml.safe_load(Layout.of(cfg).latent_stats.read_text())
    assert stats["patients"] == ["A001", "A002"] and len(stats["mean"]) == 4
    # a missing shard is a per-patient failure: exit 1 and a failure record naming the file
    assert main(["encode", "A003", "--config", str(cfg_path)]) == 1
    record = Path(cfg["results_dir"]) / "qc" / "failures" / "encode__A003.json"
    assert "shard not found" in record.read_text()
