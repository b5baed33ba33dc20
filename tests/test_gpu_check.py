"""The prepared GPU check (scripts/gpu_check.sh) runs end to end on CPU in its tiny mode and its JSON holds
real figures: a device session must not be the first time the script runs, so CI proves it on 2 cores
(tiny cohort, a handful of training steps: ~2-3 minutes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # the real Snakemake pipeline: synth -> ... -> train -> sample


def test_tiny_cpu_check_records_every_figure(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {k: s["error"] for k, s in report["steps"].items() if not s["ok"]}
    assert out.returncode == 0 and not failed, f"{failed}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert set(report["steps"]) == {"environment", "config", "pipeline", "solvers", "bench", "unet_tflops"}
    assert report["ok"] and report["mode"] == "tiny" and report["total_seconds"] > 0

    rules = report["pipeline"]["rules"]  # Snakemake benchmark records, one row per rule
    for rule in ("train_vae", "train_diffusion", "sample"):
        assert rules[rule]["jobs"] == 1 and rules[rule]["seconds"] > 0, rules
    assert report["pipeline"]["training"]["diffusion"]["steps_per_s"] > 0

    solvers = report["solvers"]["solvers"]
    assert set(solvers) == {"ddim", "dpmpp_2m", "unipc"}
    n_samples = report["config"]["overrides"]["sampling.n_samples"]
    for name, s in solvers.items():
        assert s["seconds"] > 0 and s["sample_s"] > 0, name
        assert len(s["iph_ml"]) == n_samples and all(math.isfinite(v) and v >= 0 for v in s["iph_ml"]), s

    eager = report["bench"]["eager"]  # bench_sampling.py on the trained model
    assert eager["speedup"] > 0 and eager["speedup_vs_reference"] > 0
    assert "compiled" not in report["bench"]  # --compile only on CUDA
    assert report["unet_tflops"]["best_tflops"] is None and report["unet_tflops"]["runs"] is None  # CPU: null

    cfg = (tmp_path / "gpu_check_config.yaml").read_text()
    assert "2D-ice" in cfg and (tmp_path / "results" / "mlflow" / "mlflow.db").is_file()  # sqlite tracking
