"""kill -9 loop: SIGKILL ``hemexp ingest``, ``hemexp preprocess`` and ``hemexp train-vae`` at random
moments, rerun each time, and check that the rerun's products equal an unkilled reference run's and
that no temporary file or folder is left under the results folder.

    .venv/bin/python scripts/kill_loop.py --workdir /tmp/kill_loop            # ~10-15 min on 2 cores
    .venv/bin/python scripts/kill_loop.py --ingest 2 --preprocess 2 --train 2  # a quick look

The cohort is a 5-patient synthetic cohort (3 training, 2 test), the VAE a tiny one trained for a few
dozen steps with a checkpoint every few steps, so a killed training resumes from ``last.ckpt`` (and
must end with the very same weights). Commands run directly (no Snakemake, which would delete a failed
job's outputs first): a rerun must cope with whatever the killed job left behind.

Products are compared by content: NIfTI decompressed (gzip headers hold a time), JSON without
``timings_s``, model files tensor by tensor; everything else byte for byte. Prints one line per kill
and a summary; exit 1 when a rerun differs or a temporary is left.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
HEMEXP = [sys.executable, "-m", "hemexp.cli"]
TEMP_NAME = re.compile(r"(^\..+\.tmp(\..*)?$)|(\.tmp$)|(^tmp\w{8}$)")
VOLATILE_KEYS = {"timings_s", "time_s", "time", "mlflow_run_id", "run_id"}


CODE = REPO  # replaced by a snapshot of hemexp/ + config/ (concurrent edits must not change the code mid-loop)


def config(results: Path) -> dict:
    cfg = yaml.safe_load((CODE / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["cohort"]["synthetic"].update(n_patients=5, sites={"A": 3, "D": 2}, test_sites=["D"],
                                      expander_fraction=[0.0, 1.0])
    cfg["preprocess"].update(skullstrip="builtin", template_n_patients=2, registration_mm=4.0)
    vae = cfg["vae"]
    vae.update(channels=[8, 16, 16], norm_num_groups=4, batch_size=4, accumulate=1, max_steps=40,
               resolutions=[[32, 1000]], checkpoint_every=4, lr=2e-3, log_every=5, num_workers=0)
    vae["loss"].update(adv_warmup_steps=10, disc_channels=8, disc_layers=2, perceptual_weights=None)
    return cfg


# ------------------------------------------------------------------------------------------ hashing
def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _tensor_digest(obj, h) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        h.update(str((obj.dtype, tuple(obj.shape))).encode())
        h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if k in VOLATILE_KEYS:
                continue
            h.update(str(k).encode())
            _tensor_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensor_digest(v, h)
    else:
        h.update(repr(obj).encode())


def digest(path: Path) -> str:
    h = hashlib.sha256()
    name = path.name
    if name.endswith(".gz"):
        h.update(gzip.decompress(path.read_bytes()))
    elif name.endswith(".json"):
        h.update(json.dumps(_strip(json.loads(path.read_text())), sort_keys=True).encode())
    elif name.endswith(".pt"):
        import torch

        _tensor_digest(torch.load(path, map_location="cpu", weights_only=True), h)
    else:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def product_hashes(results: Path, rel: str) -> dict[str, str]:
    """Digest of every file of one product (a file or a folder) under ``results``."""
    root = results / rel
    if root.is_file():
        return {rel: digest(root)}
    if not root.is_dir():
        return {}
    return {str(p.relative_to(results)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def temps_left(results: Path) -> list[str]:
    return sorted(str(p.relative_to(results)) for p in results.rglob("*") if TEMP_NAME.search(p.name))


# ------------------------------------------------------------------------------------------ running
def run(cmd: list[str], log: Path, kill_after: float | None = None) -> tuple[str, float]:
    """Run ``hemexp <cmd>``; with ``kill_after`` SIGKILL it (its process group) after that many
    seconds. Returns ('killed' | 'ok' | 'failed rc=N', seconds)."""
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        env = {**os.environ, "PYTHONPATH": str(CODE)}
        proc = subprocess.Popen(HEMEXP + cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=CODE, env=env)
        try:
            rc = proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "killed", time.monotonic() - t0
    return ("ok" if rc == 0 else f"failed rc={rc}"), time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hemexp_kill_loop"))
    parser.add_argument("--ingest", type=int, default=8, help="kills of hemexp ingest")
    parser.add_argument("--preprocess", type=int, default=7, help="kills of hemexp preprocess")
    parser.add_argument("--train", type=int, default=7, help="kills of hemexp train-vae")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    global CODE
    CODE = args.workdir / "code"
    for part in ("hemexp", "config"):
        shutil.copytree(REPO / part, CODE / part, ignore=shutil.ignore_patterns("__pycache__"))
    log = args.workdir / "commands.log"
    ref, kil = args.workdir / "reference", args.workdir / "killed"
    cfgs = {}
    for name, results in (("reference", ref), ("killed", kil)):
        cfgs[name] = args.workdir / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(config(results), sort_keys=False))
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    def hemexp(which: str, *cmd: str, kill_after: float | None = None) -> tuple[str, float]:
        return run([*cmd, "--config", str(cfgs[which])], log, kill_after)

    def must(which: str, *cmd: str) -> float:
        status, secs = hemexp(which, *cmd)
        if status != "ok":
            raise SystemExit(f"{which}: hemexp {' '.join(cmd)} {status}; see {log}")
        return secs

    # ---- reference run (no kills), timing each command
    t_start = time.monotonic()
    for which in ("reference", "killed"):
        must(which, "synth")
    import pandas as pd

    table = pd.read_csv(ref / "raw" / "manifest.tsv", sep="\t")
    train = sorted(table.loc[table["split"] == "train", "patient_id"])
    patients = sorted(table["patient_id"])
    dur: dict[str, list[float]] = {"ingest": [], "preprocess": [], "train-vae": []}
    for pid in patients:
        dur["ingest"].append(must("reference", "ingest", pid))
    must("reference", "build-template", "--patients", *train[:3])
    for pid in train:
        dur["preprocess"].append(must("reference", "preprocess", pid))
        must("reference", "shard", pid)
    dur["train-vae"].append(must("reference", "train-vae"))
    print(f"reference run: {time.monotonic() - t_start:.0f} s; mean seconds per command: "
          + ", ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in dur.items()), flush=True)

    stats = {k: {"kills": 0, "finished_before_kill": 0, "reruns": 0, "identical": 0, "different": []}
             for k in dur}
    leftovers: list[str] = []

    def trial(stage: str, cmd: list[str], product: str, kills: int, prepare=None) -> None:
        """One product: ``kills`` SIGKILLs at random moments (each followed by a rerun that may itself be
        killed), then a full rerun; compare with the reference and look for temporaries."""
        if prepare:
            prepare()
        done, attempts = 0, 0
        while done < kills and attempts < 3 * kills:
            attempts += 1
            at = rng.uniform(0.1, 0.9) * min(dur[stage])  # the fastest full run seen: kills land inside
            status, secs = hemexp("killed", *cmd, kill_after=at)
            if status == "killed":
                done += 1
                stats[stage]["kills"] += 1
            else:
                stats[stage]["finished_before_kill"] += 1
                dur[stage].append(secs)
                if prepare:
                    prepare()
            print(f"  {stage} {' '.join(cmd[1:])}: kill at {at:.1f} s -> {status}", flush=True)
        secs = must("killed", *cmd)
        if stage != "train-vae":  # a training rerun resumes: not a full run's duration
            dur[stage].append(secs)
        stats[stage]["reruns"] += 1
        want, got = product_hashes(ref, product), product_hashes(kil, product)
        if want and want == got:
            stats[stage]["identical"] += 1
        else:
            diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            stats[stage]["different"].append({product: diff[:10]})
            print(f"  DIFFERENT {product}: {diff[:10]}", flush=True)
        left = temps_left(kil)
        leftovers.extend(left)
        if left:
            print(f"  TEMPORARIES LEFT: {left}", flush=True)

    # ---- ingest: kills spread over the patients (a killed rerun of an already finished product too)
    per = _spread(args.ingest, len(patients))
    for pid, k in zip(patients, per, strict=True):
        trial("ingest", ["ingest", pid], f"ingested/{pid}", k)
    must("killed", "build-template", "--patients", *train[:3])
    same = product_hashes(ref, "template") == product_hashes(kil, "template")
    print(f"template identical: {same}", flush=True)
    # ---- preprocess
    for pid, k in zip(train, _spread(args.preprocess, len(train)), strict=True):
        trial("preprocess", ["preprocess", pid], f"preprocessed/{pid}", k)
        must("killed", "shard", pid)
    shards_same = all(product_hashes(ref, f"shards/{p}.parquet") == product_hashes(kil, f"shards/{p}.parquet")
                      for p in train)
    # ---- training: every trial trains from scratch, is killed 1-2 times, and resumes from last.ckpt
    vae_dir = kil / "models" / "vae"
    left_kills, n = args.train, 0
    while left_kills > 0:
        k = min(left_kills, 1 + (n % 2))
        trial("train-vae", ["train-vae"], "models/vae/vae.pt", k,
              prepare=lambda: shutil.rmtree(vae_dir, ignore_errors=True))
        left_kills -= k
        n += 1

    total = sum(s["kills"] for s in stats.values())
    ok = all(not s["different"] for s in stats.values()) and not leftovers and same and shards_same
    print("\nsummary:")
    for stage, s in stats.items():
        print(f"  {stage}: {s['kills']} kills ({s['finished_before_kill']} runs finished before their kill), "
              f"{s['reruns']} reruns, identical {s['identical']}/{s['reruns']}"
              + (f", DIFFERENT {s['different']}" if s["different"] else ""))
    print(f"  total kills: {total}; template identical: {same}; shards identical: {shards_same}")
    print(f"  temporary files/folders left under results: {len(set(leftovers))} {sorted(set(leftovers))[:10]}")
    print(f"  wall time: {time.monotonic() - t_start:.0f} s; all reruns identical and clean: {ok}")
    (args.workdir / "summary.json").write_text(json.dumps(
        {"stats": stats, "total_kills": total, "template_identical": same, "shards_identical": shards_same,
         "temps_left": sorted(set(leftovers)), "ok": ok}, indent=2))
    return 0 if ok else 1


def _spread(total: int, n: int) -> list[int]:
    """``total`` kills over ``n`` products, as evenly as possible."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


if __name__ == "__main__":
    sys.exit(main())
