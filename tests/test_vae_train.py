"""VAE training: step-indexed data, batch shaping, overfitting, accumulation, exact resume, and the
train-vae / eval-vae entry points on tiny shards with MLflow tracking."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from test_vae import discs

from hemexp.core.config import DEFAULT_CONFIG
from hemexp.engine import trainer as common
from hemexp.vae.model import MultiHeadVAE
from hemexp.vae.train import VAESlices, fit_vae, random_affine, resize_slices, resolution_at

torch.set_num_threads(1)
QUIET = {"enable_progress_bar": False}


def tiny_cfg(**overrides) -> dict:
    """The default ``vae`` section shrunk to a 32x32, 3-level, 8-channel model."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())["vae"]
    cfg.update(channels=[8, 16, 16], norm_num_groups=4, batch_size=4, accumulate=1, max_steps=6,
               resolutions=[[16, 2], [32, 100]], checkpoint_every=3, lr=2e-3, log_every=1)
    cfg["loss"].update(adv_warmup_steps=2, disc_channels=8, disc_layers=2, perceptual_weights=None)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return copy.deepcopy(cfg)


class Rows(torch.utils.data.Dataset):
    """Stands in for hemexp.vae.data.SliceDataset (context 1): baseline and follow-up triples."""

    def __init__(self, n: int = 6):
        self.bl, self.fu = discs(n, seed=1), discs(n, seed=2)

    def __len__(self) -> int:
        return len(self.bl)

    def __getitem__(self, i: int) -> dict:
        return {"bl": self.bl[i], "fu": self.fu[i], "patient_id": "P", "z": i}


# --------------------------------------------------------------------------------- data and batches
def test_vae_slices_serve_baseline_and_followup():
    rows = Rows(3)
    ds = VAESlices(rows, cache=False)
    assert len(ds) == 6
    assert torch.equal(ds[0], rows.bl[0]) and torch.equal(ds[1], rows.fu[0]) and torch.equal(ds[5], rows.fu[2])
    assert torch.equal(VAESlices(rows)[3], ds[3])  # cached copy serves the same tensors


def test_step_indexed_sampler_is_a_function_of_position():
    a = common.StepIndexedBatchSampler(10, 4, seed=1, total_batches=8)
    batches = list(a)
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches[:5] for i in b]  # 20 positions = 2 epochs, each a permutation
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    resumed = common.StepIndexedBatchSampler(10, 4, seed=1, total_batches=8, start_batch=lambda: 5)
    assert list(resumed) == batches[5:]
    assert list(common.StepIndexedBatchSampler(10, 4, seed=2, total_batches=8)) != batches
    ranks = [common.StepIndexedBatchSampler(10, 2, seed=1, total_batches=4, rank=lambda r=r: r,
                                            world_size=lambda: 2) for r in (0, 1)]
    merged = [r0 + r1 for r0, r1 in zip(*ranks, strict=True)]
    assert merged == [b for b in batches[:4]]  # two ranks of 2 = one global batch of 4


def test_resolution_schedule_and_resize_keep_masks_binary():
    schedule = [[16, 2], [32, 3]]
    assert [resolution_at(s, schedule) for s in range(7)] == [16, 16, 32, 32, 32, 32, 32]
    x = discs(2)
    small = resize_slices(x, 16)
    assert small.shape == (2, 3, 16, 16)
    assert set(torch.unique(small[:, 1:]).tolist()) <= {0.0, 1.0}
    assert small[:, 0].mean().item() == pytest.approx(x[:, 0].mean().item(), rel=1e-5)  # area average
    assert resize_slices(x, 32) is x


def test_affine_augmentation_moves_ct_and_masks_together():
    x = discs(4)
    gen = torch.Generator().manual_seed(0)
    y = random_affine(x, gen, rotate_deg=10, translate_frac=0.05, scale_frac=0.05)
    assert set(torch.unique(y[:, 1:]).tolist()) <= {0.0, 1.0}
    assert not torch.equal(y, x)
    bright = (y[:, 0] > 0.7).float()  # hematoma intensity 0.75 only inside IPH
    agree = (bright == y[:, 1]).float().mean().item()
    assert agree > 0.97
    again = random_affine(x, torch.Generator().manual_seed(0), 10, 0.05, 0.05)
    assert torch.equal(y, again)


def test_precision_and_devices_resolution():
    assert common.resolve_precision("auto", "cpu") == "32-true"
    assert common.resolve_precision("32", "cpu") == "32-true"
    assert common.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert common.resolve_devices(4, "ddp", "cpu") == (1, "auto")


# ----------------------------------------------------------------------------------------- training
def test_losses_fall_when_overfitting_a_small_batch(tmp_path):
    cfg = tiny_cfg(max_steps=30, checkpoint_every=100, resolutions=[[32, 30]], **{
        "augment.rotate_deg": 0.0, "augment.translate_frac": 0.0, "augment.scale_frac": 0.0,
        "loss.adv_warmup_steps": 1000})
    ds = VAESlices(Rows(2))
    module, trainer = fit_vae(cfg, ds, tmp_path, trainer_overrides=QUIET)
    h = module.history
    assert trainer.global_step == 30 and len(h) == 30
    first, last = h[0], np.mean([r["total"] for r in h[-3:]])
    assert last < 0.8 * first["total"]
    for term in ("ct", "iph", "ivh"):
        assert np.mean([r[term] for r in h[-3:]]) < np.mean([r[term] for r in h[:3]]), term
    assert (tmp_path / "last.ckpt").exists()


def _deterministic_posterior(monkeypatch):
    monkeypatch.setattr(MultiHeadVAE, "sample", staticmethod(lambda mu, sigma, generator=None: mu))


def test_gradient_accumulation_equals_a_large_batch(tmp_path, monkeypatch):
    _deterministic_posterior(monkeypatch)  # posterior noise differs per micro-batch by design
    common_kw = {"max_steps": 3, "resolutions": [[32, 10]], "augment.rotate_deg": 0.0, "augment.translate_frac": 0.0,
                 "augment.scale_frac": 0.0, "loss.seg_weight": 0.0, "loss.adv_weight": 0.0}
    ds = VAESlices(Rows(4))
    big, _ = fit_vae(tiny_cfg(batch_size=4, accumulate=1, **common_kw), ds, tmp_path / "big", trainer_overrides=QUIET)
    acc, tr = fit_vae(tiny_cfg(batch_size=2, accumulate=2, **common_kw), ds, tmp_path / "acc", trainer_overrides=QUIET)
    assert tr.global_step == 3  # three optimizer steps from six micro-batches
    for a, b in zip(big.history, acc.history, strict=True):
        assert a["ct"] == pytest.approx(b["ct"], rel=1e-5, abs=1e-7)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-5)


class _Kill(pl.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated kill")


def test_resume_after_kill_reproduces_the_next_losses(tmp_path):
    cfg = tiny_cfg(max_steps=6, accumulate=2, checkpoint_every=3)  # adversarial on from step 2
    ds = VAESlices(Rows(6))
    full, _ = fit_vae(cfg, ds, tmp_path / "full", trainer_overrides=QUIET)
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit_vae(cfg, ds, tmp_path / "killed", callbacks=[_Kill(at_step=4)], trainer_overrides=QUIET)
    resumed, trainer = fit_vae(cfg, ds, tmp_path / "killed", trainer_overrides=QUIET)  # automatic resume
    assert trainer.global_step == 6
    assert [r["step"] for r in resumed.history] == [4, 5, 6]  # continued from the step-3 checkpoint
    for a, b in zip(full.history[3:], resumed.history, strict=True):
        for key in ("total", "ct", "iph", "ivh", "adv", "disc"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert "adv" in resumed.history[0]


def test_resume_refuses_a_checkpoint_of_another_setup(tmp_path):
    ds = VAESlices(Rows(4))
    fit_vae(tiny_cfg(max_steps=2), ds, tmp_path, trainer_overrides=QUIET)
    other = tiny_cfg(max_steps=2, lr=1e-4)
    with pytest.raises(ValueError, match="different training setup"):
        fit_vae(other, ds, tmp_path, resume=True, trainer_overrides=QUIET)
    module, _ = fit_vae(other, ds, tmp_path, trainer_overrides=QUIET)  # automatic: starts afresh
    assert [r["step"] for r in module.history] == [1, 2]
    assert (tmp_path / "last.stale.ckpt").exists()


# ------------------------------------------------------------------------------- entry points, MLflow
def _write_shards(cfg: dict, pids_splits: list[tuple[str, str, str]]) -> None:
    from hemexp.core.clinical import CLINICAL_NAMES
    from hemexp.io.shards import patient_table, write_shard

    for k, (pid, site, split) in enumerate(pids_splits):
        nz = 4
        vols = {}
        for prefix, seed in (("bl", 10 * k), ("fu", 10 * k + 1)):
            s = discs(nz, seed=seed).numpy()  # [z, 3, y, x] -> (x, y, z) volumes, CT in HU
            vols[f"{prefix}_ct"] = np.transpose(s[:, 0] * 100.0, (2, 1, 0)).astype(np.float32)
            vols[f"{prefix}_iph"] = np.transpose(s[:, 1], (2, 1, 0)).astype(np.uint8)
            vols[f"{prefix}_ivh"] = np.transpose(s[:, 2], (2, 1, 0)).astype(np.uint8)
        meta = {"patient_id": pid, "split": split, "site": site, "expansion": k % 2, "he_prob": None,
                **{name: 1.0 for name in CLINICAL_NAMES}}
        table = patient_table(vols, (3.0, 3.0, 3.0), np.arange(nz) * 3.0, meta, margin_mm=0.0)
        write_shard(table, f"{cfg['results_dir']}/shards/{pid}.parquet", 4)


@pytest.fixture
def pipeline_cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["cohort"]["synthetic"].update(sites={"A": 2, "B": 1}, test_sites=["B"])
    cfg["vae"] = tiny_cfg(max_steps=4, checkpoint_every=2)
    _write_shards(cfg, [("A001", "A", "train"), ("A002", "A", "train"), ("B001", "B", "test")])
    return cfg


def test_train_and_eval_entry_points_track_in_mlflow(pipeline_cfg):
    import mlflow

    from hemexp.tracking.runs import RUN_ID_FILE, tracking_uri
    from hemexp.vae.fidelity import evaluate_vae
    from hemexp.vae.model import load_vae
    from hemexp.vae.train import train_vae

    cfg = pipeline_cfg
    model_path = train_vae(cfg)
    run_dir = model_path.parent
    assert load_vae(model_path).latent_channels == 4
    assert sorted(p.name for p in (run_dir / "reconstructions").iterdir()) == ["step_000002.png", "step_000004.png"]
    results = evaluate_vae(cfg)
    assert set(results) == {"Train", "Test"}
    assert results["Train"]["n_slices"] == 2 * 2 * 4 and results["Test"]["n_slices"] == 2 * 4
    metrics = f"{cfg['results_dir']}/metrics/vae_fidelity"
    table = open(metrics + ".csv").read().splitlines()
    assert table[0] == "split,CT SSIM,IPH Dice,IVH Dice" and table[1].startswith("Train,")
    assert "empty" in open(metrics + ".md").read()
    assert json.load(open(metrics + ".json"))["results"]["Test"]["n_slices"] == 8
    assert (run_dir.parent.parent / "figures" / "vae_reconstructions.png").exists()

    mlflow.set_tracking_uri(tracking_uri(cfg))
    run = mlflow.get_run((run_dir / RUN_ID_FILE).read_text().strip())
    assert run.data.tags["stage"] == "vae" and run.data.params["vae.lr"] == str(cfg["vae"]["lr"])
    assert "train_total" in run.data.metrics and "fidelity_test_ct_ssim" in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_total")
    assert [m.step for m in history] == [1, 2, 3, 4]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"model", "reconstructions", "fidelity"} <= artifacts

    # a rerun with the same config resumes the finished run: same MLflow run, no extra steps
    train_vae(cfg)
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run.info.run_id
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_total")) == 4


def test_cli_registers_vae_commands():
    from hemexp.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train-vae", "--config", "c.yaml", "--resume"])
    assert args.resume and args.config == "c.yaml"
    assert parser.parse_args(["eval-vae"]).model is None
