"""Benchmark preprocessing on this machine: seconds per patient pair for each step, and slice reads
from Parquet shards vs one NIfTI file per slice (the reference implementation's layout).

Every step runs the pipeline's own functions on real cohort patients (the synthetic cohort after
``hemexp synth``, or any manifest cohort), ``--repeats`` times; the table shows medians. Outputs go to
a temporary folder, never to ``results/``.

    .venv/bin/python scripts/bench_preprocess.py --config config/config.yaml --patients A001 A002
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np


def _timed(times: dict[str, list[float]], step: str, func, *args, **kwargs):
    """Record wall and CPU seconds of one call (CPU time is what a contended machine does not inflate)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = func(*args, **kwargs)
    times[step].append(time.perf_counter() - t0)
    times[f"{step}:cpu"].append(time.process_time() - c0)
    return out


def bench_patient(cfg: dict, pid: str, work: Path, times: dict[str, list[float]]) -> tuple:
    """One pass of every step for one patient; returns (shard path, model-grid volumes, shard z, affine)."""
    from hemexp.core.clinical import CLINICAL_NAMES
    from hemexp.io.nifti import make_image
    from hemexp.io.shards import IMAGE_COLUMNS, patient_table, write_shard
    from hemexp.preprocess.pipeline import (
        KINDS,
        TIMEPOINTS,
        lesion_safe_brain,
        load_timepoint,
        patient_row,
        resample_timepoint,
        skull_stripped,
        template_grid,
    )
    from hemexp.preprocess.qc import qc_figure
    from hemexp.preprocess.register import (
        MODEL_GRID,
        TRANSFORMS_DIR,
        nib_to_ants,
        register_baseline,
        register_followup,
        save_native_grid,
    )

    pre, row = cfg["preprocess"], patient_row(cfg, pid)
    pdir = work / pid
    tdir = pdir / TRANSFORMS_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    imgs = _timed(times, "ingest", lambda: {tp: load_timepoint(row, tp, cfg["cohort"]["mask_labels"], pid)
                                            for tp in TIMEPOINTS})
    brains = _timed(times, "skullstrip", lambda: {tp: lesion_safe_brain(p["ct"], p["iph"], p["ivh"], cfg, pid)[0]
                                                  for tp, p in imgs.items()})
    template, _, grid = template_grid(cfg)
    grid.save(tdir / MODEL_GRID)
    save_native_grid(imgs["bl"]["ct"], pdir)
    stripped = {tp: skull_stripped(p["ct"], brains[tp]) for tp, p in imgs.items()}
    ants_img = {tp: nib_to_ants(img) for tp, img in stripped.items()}
    seed, mm = cfg["seed"], pre["registration_mm"]
    _timed(times, "rigid", register_baseline, nib_to_ants(template), ants_img["bl"], seed, mm, tdir, work)
    _timed(times, "affine", register_followup, ants_img["bl"], ants_img["fu"], seed, mm, tdir, work)

    def resample() -> dict[str, np.ndarray]:
        vols = {}
        for tp in TIMEPOINTS:
            brain = make_image(brains[tp], stripped[tp].affine)
            vols.update(resample_timepoint(stripped[tp], brain, {k: imgs[tp][k] for k in KINDS}, pdir, tp))
        return vols

    vols = _timed(times, "resample_crop", resample)
    _timed(times, "qc", qc_figure, vols, pre["hu_window"], pdir / "qc.png", pid)
    meta = {"patient_id": pid, "split": row["split"], "site": row["site"], "expansion": 0, "he_prob": None,
            **{n: row[n] for n in CLINICAL_NAMES}}
    table = patient_table({c: vols[c] for c in IMAGE_COLUMNS}, grid.spacing, grid.z_mm(), meta,
                          cfg["shards"]["context_margin_mm"])
    shard = _timed(times, "shard", write_shard, table, work / "shards" / f"{pid}.parquet", cfg["shards"]["row_group_rows"])
    return shard, {c: vols[c] for c in IMAGE_COLUMNS}, table["z"].to_pylist(), grid.affine


def write_slice_files(vols: dict[str, np.ndarray], zs: list[int], affine: np.ndarray, folder: Path) -> None:
    """The per-slice layout of the reference implementation: one NIfTI file per slice and channel."""
    from hemexp.io.nifti import make_image, save_nifti

    for key, data in vols.items():
        for z in zs:
            save_nifti(make_image(data[:, :, z][..., None], affine), folder / f"{z:03d}_{key}.nii.gz")


def bench_reads(shards: list[Path], slice_dir: Path, hu_window: tuple[float, float], repeats: int) -> dict[str, float]:
    """Slices/s: SliceDataset over shards (first pass = decompression, then cached) vs NIfTI per slice."""
    from hemexp.io.shards import IMAGE_COLUMNS
    from hemexp.vae.data import SliceDataset, vae_channels

    cold, warm, nifti = [], [], []
    for _ in range(repeats):
        ds = SliceDataset(shards, splits=None, hu_window=hu_window)
        for rates in (cold, warm):
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            rates.append(len(ds) / (time.perf_counter() - t0))
        items = sorted({(p.parent, p.name[:3]) for p in slice_dir.rglob("*_bl_ct.nii.gz")})
        t0 = time.perf_counter()
        for folder, z in items:
            arrays = {c: np.asarray(nib.load(folder / f"{z}_{c}.nii.gz").dataobj)[..., 0] for c in IMAGE_COLUMNS}
            for tp in ("bl", "fu"):
                np.stack(vae_channels(arrays[f"{tp}_ct"], arrays[f"{tp}_iph"], arrays[f"{tp}_ivh"], hu_window))
        nifti.append(len(items) / (time.perf_counter() - t0))
    return {"shard, first pass (decompress)": statistics.median(cold), "shard, cached (per worker)": statistics.median(warm),
            "NIfTI file per slice and channel": statistics.median(nifti)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--patients", nargs="+", default=None, help="patient IDs (default: the first two)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from hemexp.cohort.manifest import read_manifest
    from hemexp.core.config import load_config
    from hemexp.core.layout import manifest_path

    cfg = load_config(args.config)
    pids = args.patients or list(read_manifest(manifest_path(cfg), check_files=False)["patient_id"][:2])
    times: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="hemexp_bench_") as tmp:
        work = Path(tmp)
        for _ in range(args.repeats):
            outputs = [bench_patient(cfg, pid, work, times) for pid in pids]
        for pid, (_, vols, zs, affine) in zip(pids, outputs, strict=True):
            write_slice_files(vols, zs, affine, work / "slices" / pid)
        shards = [out[0] for out in outputs]
        reads = bench_reads(shards, work / "slices", tuple(cfg["preprocess"]["hu_window"]), args.repeats)
        n_slices = sum(1 for _ in (work / "slices").rglob("*_bl_ct.nii.gz"))
    print(f"patients {pids}, {args.repeats} repeats, grid {cfg['preprocess']['spacing_mm']} mm, crop "
          f"{cfg['preprocess']['crop']}, registration at {cfg['preprocess']['registration_mm']} mm")
    steps = ("ingest", "skullstrip", "rigid", "affine", "resample_crop", "qc", "shard")
    print(f"{'step':<22} {'median wall s / pair':>22} {'median CPU s / pair':>22}")
    for step in (*steps, "total"):
        if step == "total":
            wall, cpu = (sum(statistics.median(times[s + k]) for s in steps) for k in ("", ":cpu"))
        else:
            wall, cpu = statistics.median(times[step]), statistics.median(times[f"{step}:cpu"])
        print(f"{step:<22} {wall:>22.3f} {cpu:>22.3f}")
    print(f"\nslice reads ({n_slices} slices, 2D items: bl + fu CT/IPH/IVH)")
    print(f"{'reader':<34} {'median slices / s':>24}")
    for name, rate in reads.items():
        print(f"{name:<34} {rate:>24.1f}")


if __name__ == "__main__":
    main()
