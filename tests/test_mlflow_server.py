"""MLflow against a real tracking server: runs are tagged, read back, and compared side by side.

A real ``mlflow server`` (sqlite backend and proxied artifact store in a temp folder, a free port on
127.0.0.1) is what a team uses; the file-store default could hide problems with the REST path
(artifact proxying, tags set after a run starts). The server is stopped by its process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from workflow_helpers import VENV_BIN, manifest_config, write_config, write_manifest

from hemexp.core.config import config_hash
from hemexp.tracking.compare import comparison_table, render
from hemexp.tracking.runs import RUN_ID_FILE, log_to_model_run, start_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free local port; yields its URI, then stops exactly what it started."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed in the teardown below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"uri": url, "artifacts": root / "artifacts"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the session started above: the server and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.fixture()
def tracked_cfg(tmp_path, mlflow_server, monkeypatch):
    """A manifest-cohort config whose runs go to the test server (via MLFLOW_TRACKING_URI)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    manifest = write_manifest(tmp_path / "raw" / "manifest.tsv", ["TR01"], ["TE01"])
    cfg = manifest_config(manifest, results=tmp_path / "results")
    cfg["tracking"]["experiment"] = f"hemexp-{tmp_path.name}"
    return cfg


def _diffusion_run(cfg, tmp_path: Path, variant: str, gamma: float, mae: float) -> str:
    cfg = {**cfg, "diffusion": {**cfg["diffusion"], "min_snr_gamma": gamma}}
    run_dir = tmp_path / "models" / variant
    with start_run(cfg, "diffusion", run_dir, variant=variant) as run:
        import mlflow

        mlflow.log_metric("train_loss", 0.5 * gamma)
    report = tmp_path / f"{variant}_report.md"
    report.write_text(f"# {variant}\n")
    log_to_model_run(cfg, run_dir, {"mae_ml": mae}, artifacts=[report], artifact_path="evaluation")
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run.info.run_id
    return run.info.run_id


@pytest.mark.slow
def test_runs_are_tagged_and_artifacts_served(tracked_cfg, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    run_id = _diffusion_run(tracked_cfg, tmp_path, "2D-ice", 5.0, 12.9)
    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    run = client.get_run(run_id)
    cfg = {**tracked_cfg, "diffusion": {**tracked_cfg["diffusion"], "min_snr_gamma": 5.0}}
    assert run.data.tags["stage"] == "diffusion" and run.data.tags["variant"] == "2D-ice"
    assert run.data.tags["config_hash"] == config_hash(cfg)
    assert run.data.tags["data_version"].startswith("manifest:")
    assert run.data.tags["git_commit"]
    assert run.data.params["diffusion.min_snr_gamma"] == "5.0"
    assert run.data.metrics == {"train_loss": 2.5, "mae_ml": 12.9}
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")] == ["evaluation/2D-ice_report.md"]
    assert list(mlflow_server["artifacts"].rglob("2D-ice_report.md"))  # stored by the server's proxy


def test_data_version_is_the_dvc_hash_when_raw_data_is_tracked(tmp_path):
    from hemexp.tracking.runs import data_version

    cfg = manifest_config(write_manifest(tmp_path / "raw" / "manifest.tsv", ["TR01"], ["TE01"]))
    assert data_version(cfg).startswith("manifest:")
    (tmp_path / "raw.dvc").write_text("outs:\n- md5: 0123456789abcdef.dir\n  size: 1\n  nfiles: 2\n"
                                      "  hash: md5\n  path: raw\n")
    assert data_version(cfg) == "dvc:0123456789abcdef.dir"


@pytest.mark.slow
def test_hemexp_compare_reads_runs_back_side_by_side(tracked_cfg, tmp_path, mlflow_server):
    ids = [_diffusion_run(tracked_cfg, tmp_path, v, g, m) for v, g, m in (("2D-ice", 5.0, 12.9), ("2D-i", 1.0, 14.4))]
    with start_run(tracked_cfg, "vae", tmp_path / "models" / "vae"):
        pass  # a run of another stage, which the filter must leave out
    cfg_file = write_config(tmp_path / "config.yaml", tracked_cfg)
    cmd = [str(VENV_BIN / "hemexp"), "compare", "--config", str(cfg_file), "--filter", "tags.stage='diffusion'",
           "--params", "diffusion.min_snr_gamma", "--metrics", "mae_ml", "train_loss", "--format", "csv",
           "--out", str(tmp_path / "compare.csv")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "compare.csv", index_col=0, dtype=str)
    assert len(table.columns) == 2 and all(any(i[:8] in c for c in table.columns) for i in ids)
    assert set(table.loc["tags.variant"]) == {"2D-ice", "2D-i"}
    by_variant = {table.loc["tags.variant", c]: table[c] for c in table.columns}
    assert by_variant["2D-ice"]["params.diffusion.min_snr_gamma"] == "5.0"
    assert by_variant["2D-i"]["params.diffusion.min_snr_gamma"] == "1.0"
    assert float(by_variant["2D-ice"]["metrics.mae_ml"]) == pytest.approx(12.9)
    assert float(by_variant["2D-i"]["metrics.train_loss"]) == pytest.approx(0.5)
    assert out.stdout == (tmp_path / "compare.csv").read_text()


def test_comparison_table_defaults_to_differing_params():
    import pandas as pd

    runs = pd.DataFrame({
        "run_id": ["aaaaaaaa11", "bbbbbbbb22"], "tags.mlflow.runName": ["diffusion-2D-ice", "diffusion-2D-i"],
        "tags.stage": ["diffusion", "diffusion"], "params.seed": ["0", "0"],
        "params.diffusion.lr": ["2e-4", "1e-4"], "metrics.mae_ml": [12.91, float("nan")],
    })
    table = comparison_table(runs)
    assert list(table.index) == ["tags.stage", "params.diffusion.lr", "metrics.mae_ml"]
    assert list(table.columns) == ["diffusion-2D-ice (aaaaaaaa)", "diffusion-2D-i (bbbbbbbb)"]
    assert list(table.loc["metrics.mae_ml"]) == ["12.91", ""]
    assert "params.seed" in comparison_table(runs, all_params=True).index
    assert render(table, "markdown").splitlines()[0] == "| field | diffusion-2D-ice (aaaaaaaa) | diffusion-2D-i (bbbbbbbb) |"
    assert render(comparison_table(pd.DataFrame())) == "no matching runs\n"


def _write_tiny_shards(cfg: dict, patients: list[tuple[str, str]], size: int = 32, nz: int = 3) -> None:
    """Shards of 32x32 slices (a brain ellipse with a hematoma disc), enough for a 2-step VAE run."""
    import numpy as np

    from hemexp.core.clinical import CLINICAL_NAMES
    from hemexp.io.shards import patient_table, write_shard

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    brain = ((xx - 0.5) / 0.38) ** 2 + ((yy - 0.5) / 0.45) ** 2 < 1
    for k, (pid, split) in enumerate(patients):
        vols = {}
        for prefix, r in (("bl", 0.10 + 0.01 * k), ("fu", 0.14 + 0.01 * k)):
            iph = ((xx - 0.5) ** 2 + (yy - 0.55) ** 2 < r * r) & brain
            ct = np.where(iph, 75.0, np.where(brain, 35.0, 0.0)).astype(np.float32)
            vols[f"{prefix}_ct"] = np.repeat(ct.T[:, :, None], nz, axis=2)
            vols[f"{prefix}_iph"] = np.repeat(iph.T[:, :, None], nz, axis=2).astype(np.uint8)
            vols[f"{prefix}_ivh"] = np.zeros_like(vols[f"{prefix}_iph"])
        meta = {"patient_id": pid, "split": split, "site": "A" if split == "train" else "D", "expansion": k % 2,
                "he_prob": None, **{name: 1.0 for name in CLINICAL_NAMES}}
        table = patient_table(vols, (3.0, 3.0, 3.0), np.arange(nz) * 3.0, meta, margin_mm=0.0)
        write_shard(table, f"{cfg['results_dir']}/shards/{pid}.parquet", 4)


@pytest.mark.slow
def test_train_vae_logs_to_the_server(tmp_path, mlflow_server):
    """`hemexp train-vae` (2 steps, tiny model, CPU) against the server: a tagged run with its config
    as params, a loss history and uploaded artifacts, which `hemexp compare` then lists."""
    from mlflow.tracking import MlflowClient

    manifest = write_manifest(tmp_path / "raw" / "manifest.tsv", ["TR01", "TR02"], ["TE01"])
    cfg = manifest_config(manifest, results=tmp_path / "results")
    cfg["tracking"]["experiment"] = "hemexp-train-vae"
    cfg["vae"].update(channels=[8, 16, 16], norm_num_groups=4, batch_size=4, max_steps=2, log_every=1,
                      checkpoint_every=2, resolutions=[[32, 100]], precision="32")
    cfg["vae"]["loss"].update(disc_channels=8, disc_layers=2, perceptual_weights=None)
    _write_tiny_shards(cfg, [("TR01", "train"), ("TR02", "train"), ("TE01", "test")])
    cfg_file = write_config(tmp_path / "config.yaml", cfg)
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server["uri"], OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([str(VENV_BIN / "hemexp"), "train-vae", "--config", str(cfg_file)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = (tmp_path / "results" / "models" / "vae" / RUN_ID_FILE).read_text().strip()
    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    run = client.get_run(run_id)
    assert run.data.tags["stage"] == "vae" and run.data.tags["config_hash"] == config_hash(cfg)
    assert run.data.params["vae.max_steps"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "train_total")] == [1, 2]
    assert client.list_artifacts(run_id)  # model / figures uploaded through the server
    listing = subprocess.run([str(VENV_BIN / "hemexp"), "compare", "--config", str(cfg_file), "--filter",
                              "tags.stage='vae'", "--metrics", "train_total"], capture_output=True, text=True,
                             timeout=120, env=env)
    assert listing.returncode == 0 and run_id[:8] in listing.stdout and "metrics.train_total" in listing.stdout
