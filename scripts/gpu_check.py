#!/usr/bin/env python
"""Prepared GPU check: the real pipeline, every solver, the sampler benchmark and U-Net TFLOP/s in one run.

One unattended command says whether HemExp works on a GPU and how fast: Snakemake trains the VAE and
the 2D-ice diffusion model (a few hundred steps, bf16-mixed on CUDA) and samples one test patient; each
solver samples it again; ``scripts/bench_sampling.py`` runs eager and (CUDA) ``--compile``; the U-Net's
achieved TFLOP/s is measured. Every figure goes to ``<out>/gpu_check.json`` (rewritten after each step);
a failing step records its error and the next one still runs, so one short device session yields all
it can. Full mode fits 8 minutes on one H100/H200 (subprocess timeouts come out of that budget);
``--tiny`` shrinks cohort and training to a 2-core CPU smoke test.

    bash scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # hemexp / snakemake of the interpreter running this script
VARIANT = "2D-ice"
SOLVERS = ("ddim", "dpmpp_2m", "unipc")
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name substring, first match wins
# (an H100 SXM calls itself "NVIDIA H100 80GB HBM3"; a GH200 matches "H200").
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))
BUDGET_S = {"full": 480.0, "tiny": 300.0}  # subprocess timeouts are cut to what is left of this


class Check:
    """The run's state: arguments, the JSON report and the time budget every subprocess is cut to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0, self.out = args, time.perf_counter(), Path(args.out).resolve()
        self.mode = "tiny" if args.tiny else "full"
        self.results, self.config_path = self.out / "results", self.out / "gpu_check_config.yaml"
        self.cfg: dict[str, Any] = {}
        self.report: dict[str, Any] = {"mode": self.mode, "device": args.device, "out": str(self.out),
                                       "steps": {}}
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("MLFLOW_TRACKING_URI", None)  # tracking: the sqlite store under results_dir
        if args.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # every job on CPU, even on a GPU machine

    def left(self, floor: float = 30.0) -> float:
        """Seconds of the budget left (at least ``floor``, so a late step still gets a try)."""
        return max(floor, BUDGET_S[self.mode] - (time.perf_counter() - self.t0))

    def run(self, cmd: list[str], log: str) -> None:
        """Run a command from the repo root, output to ``<out>/logs/<log>.log``; raise on failure. A
        timeout kills the whole process group (Snakemake's jobs too), so nothing outlives the check."""
        path = self.out / "logs" / f"{log}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=self.left())
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        if code != 0:
            tail = path.read_text()[-1500:]
            raise RuntimeError(f"{Path(cmd[0]).name} {cmd[1]} exited {code} (log {path}):\n{tail}")

    def step(self, name: str, fn: Callable[[Check], dict[str, Any]]) -> None:
        """Run one step: its figures go to ``report[name]``, its status to ``report['steps'][name]``."""
        print(f"[gpu_check] {name} ...", flush=True)
        t = time.perf_counter()
        status: dict[str, Any] = {"ok": True, "error": None}
        try:
            self.report[name] = fn(self)
        except Exception as err:  # record it (a timeout too) and go on with the next step
            status = {"ok": False, "error": f"{type(err).__name__}: {err}"[:4000],
                      "traceback": traceback.format_exc()[-3000:]}
        status["seconds"] = round(time.perf_counter() - t, 2)
        self.report["steps"][name] = status
        print(f"[gpu_check] {name}: {'ok' if status['ok'] else 'FAILED ' + status['error'][:300]} "
              f"({status['seconds']:.1f} s)", flush=True)
        self.save()

    def save(self) -> None:
        self.report["total_seconds"] = round(time.perf_counter() - self.t0, 2)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(clean(self.report), indent=2) + "\n")


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON readers reject them)."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def environment(c: Check) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
                            "torch_cuda": torch.version.cuda}
    if c.args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=p.name, compute_capability=f"{p.major}.{p.minor}",
                    total_memory_gib=round(p.total_memory / 2**30, 2), bf16=torch.cuda.is_bf16_supported(),
                    peak_bf16_tflops=peak_tflops(p.name))
    return info


def overrides(c: Check) -> dict[str, Any]:
    """Dotted overrides of config/config.yaml. The YAML written is the whole config, but Snakemake merges
    it leaf by leaf onto config.yaml: the default diffusion variants and flag passes stay defined there
    (harmless, only the targets are built), and every default site keeps a key (else it would return)."""
    full = c.mode == "full"
    steps = 300 if full else 4
    prec = "bf16-mixed" if c.args.device == "cuda" else "auto"  # auto = 32-true on CPU
    o: dict[str, Any] = {
        "results_dir": str(c.results), "preprocess.skullstrip": "builtin",
        "vae.max_steps": steps, "vae.checkpoint_every": steps, "vae.precision": prec,
        "vae.resolutions": [[64 if full else 48, steps]],
        "diffusion.variants": {VARIANT: {"context": 1, "conditioning": "ice"}},
        "diffusion.max_steps": steps, "diffusion.checkpoint_every": steps, "diffusion.precision": prec,
        "sampling.variants": [VARIANT], "evaluation.perturbation_variant": VARIANT,
        "evaluation.flag_source_passes": {}, "baselines": ["copy"], "tracking.uri": None,
    }
    if not full:  # 4 training + 1 test patient on a 4 mm grid: a smoke test, not a model. That grid lowers
        # some heads' follow-up/baseline brain correlation below the identity gate (0.75, a guard against
        # swapped patients, which a synthetic cohort has none of).
        syn = {"n_patients": 5, "sites": {"A": 2, "B": 1, "C": 1, "D": 1}, "test_sites": ["D"], "matrix": 64,
               "inplane_mm": 3.5, "slice_thickness_mm": [4.0, 5.0], "formats": ["nifti"],
               "expander_fraction": [0.25, 1.0]}
        o.update({f"cohort.synthetic.{k}": v for k, v in syn.items()})
        o.update({"preprocess.spacing_mm": [4.0, 4.0, 4.0], "preprocess.crop": [48, 48],
                  "preprocess.registration_mm": 4.0, "preprocess.template_n_patients": 2,
                  "preprocess.min_identity_ncc": 0.5, "vae.batch_size": 4, "vae.log_every": 2,
                  "diffusion.batch_size": 8, "diffusion.log_every": 2, "sampling.n_samples": 2,
                  "sampling.ddim_steps": 4, "latents.batch_size": 16})
    return o


def build_config(c: Check) -> dict[str, Any]:
    from hemexp.core.config import DEFAULT_CONFIG, load_config

    o = overrides(c)
    c.cfg = load_config(DEFAULT_CONFIG, o)  # validate_config: hemexp validate-config's check
    c.out.mkdir(parents=True, exist_ok=True)
    c.config_path.write_text(yaml.safe_dump(c.cfg, sort_keys=False))
    return {"path": str(c.config_path), "overrides": o}


def test_patient(c: Check) -> str:
    from hemexp.cohort.patients import synthetic_patient_ids

    return sorted(pid for pid, _, split in synthetic_patient_ids(c.cfg) if split == "test")[0]


def pipeline(c: Check) -> dict[str, Any]:
    from hemexp.core.layout import Layout
    from hemexp.workflow.benchmarks import read_records, rule_times

    L, pid = Layout.of(c.cfg), test_patient(c)
    targets = [str(L.diffusion_model(VARIANT)), str(L.samples(VARIANT, pid) / "summary.json")]
    cores = (os.cpu_count() or 1) if c.mode == "full" else min(2, os.cpu_count() or 1)
    t = time.perf_counter()
    c.run([str(VENV_BIN / "snakemake"), *targets, "--cores", str(cores), "--configfile", str(c.config_path),
           "--directory", str(REPO)], "snakemake")
    wall = time.perf_counter() - t
    rules = {r["rule"]: {"jobs": int(r["jobs"]), "seconds": float(r["total_s"]), "max_s": float(r["max_s"]),
                         "cpu_s": float(r["cpu_s"]), "max_rss_mb": float(r["max_rss_mb"])}
             for r in rule_times(read_records(L.benchmarks_dir)).to_dict("records")}
    training = {}
    for name, rule, folder in (("vae", "train_vae", L.vae_dir),
                               ("diffusion", "train_diffusion", L.diffusion_dir(VARIANT))):
        steps = c.cfg[name]["max_steps"]
        info: dict[str, Any] = {"max_steps": steps, "job_seconds": rules.get(rule, {}).get("seconds")}
        if info["job_seconds"]:  # with start-up, data loading and tracking: a lower bound on steps/s
            info["steps_per_s_job"] = steps / info["job_seconds"]
        if (folder / "summary.json").is_file():  # train-diffusion writes one (train-vae does not)
            s = json.loads((folder / "summary.json").read_text())
            info.update({k: s[k] for k in ("steps", "train_seconds", "final_loss", "parameters") if k in s})
            if s.get("train_seconds"):
                info["steps_per_s"] = s.get("steps", steps) / s["train_seconds"]
        training[name] = info
    sample = json.loads((L.samples(VARIANT, pid) / "summary.json").read_text())
    return {"targets": targets, "cores": cores, "wall_seconds": wall, "rules": rules, "training": training,
            "test_patient": pid, "sample_timings_s": sample.get("timings_s"),
            "sample_iph_median_ml": sample["followup_ml"]["iph"]["median"]}


def solvers(c: Check) -> dict[str, Any]:
    """Each solver through ``hemexp sample --solver``: ``hemexp simulate``'s sampling code path
    (simulate_patient) without re-registering a patient the pipeline already preprocessed."""
    import pandas as pd

    pid, out = test_patient(c), {}
    for solver in SOLVERS:
        folder, t = c.out / "solvers" / solver, time.perf_counter()
        c.run([str(VENV_BIN / "hemexp"), "sample", VARIANT, pid, "--solver", solver, "--out", str(folder),
               "--device", c.args.device, "--config", str(c.config_path)], f"sample_{solver}")
        s = json.loads((folder / "summary.json").read_text())
        out[solver] = {"seconds": time.perf_counter() - t, "steps": s.get("ddim_steps"),
                       "sample_s": s["timings_s"].get("sample_s"), "total_s": s["timings_s"].get("total_s"),
                       "chunk_rows": s.get("sampler", {}).get("chunk_rows"),
                       "iph_ml": pd.read_csv(folder / "volumes.tsv", sep="\t")["iph_ml"].tolist(),
                       "iph_median_ml": s["followup_ml"]["iph"]["median"]}
    return {"patient": pid, "solvers": out}


def bench(c: Check) -> dict[str, Any]:
    """``scripts/bench_sampling.py`` on the trained model, eager and (CUDA) compiled, side by side."""
    from hemexp.core.layout import Layout

    ref, repeats = ("100", "2") if c.mode == "full" else ("5", "1")
    runs: dict[str, Any] = {}
    for compiled in (False, True) if c.args.device == "cuda" else (False,):
        name = "compiled" if compiled else "eager"
        path = c.out / f"bench_{name}.json"
        c.run([sys.executable, str(REPO / "scripts" / "bench_sampling.py"), "--config", str(c.config_path),
               "--model", str(Layout.of(c.cfg).diffusion_model(VARIANT)), "--reference-steps", ref,
               "--repeats", repeats, "--device", c.args.device, "--threads", str(min(os.cpu_count() or 1, 8)),
               "--out", str(path), *(["--slices", "4"] if c.mode == "tiny" else []),
               *(["--compile"] if compiled else [])], f"bench_{name}")
        r = json.loads(path.read_text())
        runs[name] = {"speedup": r["speedup"], "speedup_vs_reference": r.get("speedup_vs_reference"),
                      **{f"{k}_items_per_s": r[k]["items_per_s"] for k in ("loop", "batched", "reference")
                         if k in r},
                      "batched_chunk_rows": r["batched"]["chunk_rows"], "json": str(path)}
    if "compiled" in runs:
        runs["compile_gain"] = runs["compiled"]["batched_items_per_s"] / runs["eager"]["batched_items_per_s"]
    return runs


def unet_tflops(c: Check) -> dict[str, Any]:
    """Achieved U-Net TFLOP/s at the sampler's derived chunk size: how much of the chip its batching uses."""
    if c.args.device != "cuda":
        return dict.fromkeys(("rows", "flops_per_forward", "peak_tflops", "runs", "best_tflops"))
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hemexp.core.layout import Layout
    from hemexp.diffusion.model import load_diffusion
    from hemexp.sampling.sampler import auto_chunk_size

    dev = torch.device("cuda")
    model, _, _ = load_diffusion(Layout.of(c.cfg).diffusion_model(VARIANT), map_location=dev)
    factor = 2 ** (len(c.cfg["vae"]["channels"]) - 1)
    shape = (model.latent_channels, *(int(v) // factor for v in c.cfg["preprocess"]["crop"]))
    rows = auto_chunk_size(model, shape, dev, float(c.cfg["sampling"]["memory_fraction"]))
    g = torch.Generator(device=dev).manual_seed(0)
    inputs = (torch.randn(rows, *shape, device=dev, generator=g),
              torch.randint(0, int(c.cfg["diffusion"]["timesteps"]), (rows,), device=dev, generator=g),
              torch.randn(rows, shape[0] * model.context, *shape[1:], device=dev, generator=g),
              torch.rand(rows, 7, device=dev, generator=g),
              torch.randint(0, 2, (rows,), device=dev, generator=g))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    flops, peak = int(counter.get_total_flops()), peak_tflops(torch.cuda.get_device_name(dev))
    runs = measure_unet(model, inputs, flops, peak, lambda: c.left(0) >= 60)
    return {"rows": rows, "latent_shape": list(shape), "flops_per_forward": flops, "peak_tflops": peak,
            "runs": runs, "best_tflops": max((r["tflops"] for r in runs if "tflops" in r), default=None)}


def measure_unet(model: Any, inputs: tuple, flops: int, peak: float | None,
                 may_compile: Callable[[], bool]) -> list[dict[str, Any]]:
    """Time bf16-autocast forwards with channels_last and torch.compile each on/off (a compile is skipped
    once ``may_compile()`` says the budget is spent); device-agnostic, so it can be dry-run on CPU."""
    import torch

    x, t, base, clin, flag = inputs

    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    runs: list[dict[str, Any]] = []
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        xs, bs = x.contiguous(memory_format=fmt), base.contiguous(memory_format=fmt)
        for compiled in (False, True):
            if compiled and not may_compile():
                runs.append({"channels_last": channels_last, "compile": True, "skipped": "time budget"})
                continue
            torch._dynamo.reset()
            fn = torch.compile(model) if compiled else model
            with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16):
                for _ in range(3):  # warm-up: kernels, autotuning, compilation
                    fn(xs, t, bs, clin, flag)
                sync()
                n, t0 = 0, time.perf_counter()
                while n < 10 or (time.perf_counter() - t0 < 2.0 and n < 200):
                    fn(xs, t, bs, clin, flag)
                    n += 1
                sync()
                secs = (time.perf_counter() - t0) / n
            tf = flops / secs / 1e12
            runs.append({"channels_last": channels_last, "compile": compiled, "ms_per_forward": secs * 1e3,
                         "tflops": tf, "fraction_of_peak": tf / peak if peak else None})
    model.to(memory_format=torch.contiguous_format)
    return runs


def summary(c: Check) -> None:
    """A few lines for the terminal; the JSON holds everything."""
    r = c.report
    print("  steps: " + ", ".join(f"{k} {'ok' if s['ok'] else 'FAILED'} {s['seconds']:.1f}s"
                                  for k, s in r["steps"].items()))
    rules = r.get("pipeline", {}).get("rules", {})
    print("  rules: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in rules.items()))
    for k, v in r.get("solvers", {}).get("solvers", {}).items():
        print(f"  {k:9s} {v['seconds']:6.1f} s, sampler {v['sample_s']:.2f} s, "
              f"IPH median {v['iph_median_ml']:.2f} mL")
    for k, v in (i for i in r.get("bench", {}).items() if isinstance(i[1], dict)):
        print(f"  bench {k}: batched/loop {v['speedup']:.1f}x, "
              f"batched/reference {v['speedup_vs_reference'] or 0:.1f}x")
    u = r.get("unet_tflops") or {}
    if u.get("best_tflops"):
        print(f"  U-Net best {u['best_tflops']:.1f} TFLOP/s (peak {u['peak_tflops']})")
    print(f"  {'ok' if r['ok'] else 'FAILED'}, total {r['total_seconds']:.1f} s -> {c.out}/gpu_check.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default="gpu_check")
    ap.add_argument("--tiny", action="store_true", help="tiny cohort and training (2-core CPU smoke test)")
    c = Check(ap.parse_args(argv))
    for name, fn in (("environment", environment), ("config", build_config), ("pipeline", pipeline),
                     ("solvers", solvers), ("bench", bench), ("unet_tflops", unet_tflops)):
        c.step(name, fn)
    c.report["ok"] = all(s["ok"] for s in c.report["steps"].values())
    c.save()
    summary(c)
    return 0 if c.report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
