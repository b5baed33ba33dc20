"""From sampled slices to a patient's products: 3D follow-ups, probability maps, volumes, native space.

Reassembly: each sample's follow-up is the baseline volume on the model grid (template space) with the
sampled slices replaced by the decoded ones — CT in HU, IPH/IVH masks {0, 1}; slices outside the
sampled z-range are the baseline's (the model only predicts change near the hematoma).

Probability maps (one per flag that has samples, and mixed): the voxel frequency of IPH, IVH and
*new hemorrhage* (hemorrhagic in the sample — IPH or IVH — but outside the baseline IPH ∪ IVH mask)
among that flag's samples; the mixed map is ``p · map_flag1 + (1 − p) · map_flag0``
(:func:`mix_maps`, weights from :class:`hemexp.sampling.flags.FlagPlan`).

Layout of ``results/samples/{v}/{p}/`` (model grid unless under ``native/``)::

    samples/sample_{k:02d}_{ct,iph,ivh}.nii.gz      CT float32 HU, masks uint8
    maps/{iph,ivh,new}_prob.nii.gz                  mixed maps, float32 in [0, 1]
    maps/{iph,ivh,new}_prob_flag{0,1}.nii.gz        per-flag maps (each flag that has samples)
    native/sample_{k:02d}_{ct,iph,ivh}.nii.gz       the samples on the native baseline scan's grid
    native/{iph,ivh,new}_prob.nii.gz                mixed maps on the native grid
    volumes.tsv  summary.json  figure.png
    dicom/                                          optional DICOM outputs (:func:`write_dicom_products`)

Native mapping uses the patient's saved transforms through :func:`hemexp.preprocess.register.to_native`
(CT and maps linear, masks with the label interpolator).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hemexp.core.clinical import is_expansion, mask_volume_ml
from hemexp.core.files import atomic_path
from hemexp.core.layout import DICOM_DIR, MAP_KINDS, SAMPLE_MASK, SAMPLE_STRUCTURES
from hemexp.io.nifti import make_image, read_volume, save_nifti
from hemexp.io.shards import volume_from_slices
from hemexp.preprocess.register import to_native
from hemexp.sampling.flags import FlagPlan
from hemexp.sampling.intervals import empirical_interval

INTERVAL_LEVEL = 0.8
VOLUME_COLUMNS = ("patient_id", "variant", "sample", "flag", "flag_source", "guidance_scale", "iph_ml", "ivh_ml",
                  "total_ml", "new_ml", "expansion", "baseline_iph_ml", "baseline_total_ml")


def assemble(baseline_vol: np.ndarray, images: np.ndarray, zs: Sequence[int]) -> np.ndarray:
    """The baseline volume with slices ``zs`` replaced by ``images`` ``[S, H, W]`` (shard image layout)."""
    vol = np.array(baseline_vol, dtype=np.result_type(baseline_vol.dtype, images.dtype), copy=True)
    patch = volume_from_slices(images, zs, vol.shape, dtype=vol.dtype)
    vol[:, :, np.asarray(zs)] = patch[:, :, np.asarray(zs)]
    return vol


def sample_volumes(zs: np.ndarray, slices: dict[str, np.ndarray], baseline: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{ct, iph, ivh}`` each ``[N, X, Y, Z]``: every sample reassembled onto the baseline volume."""
    out = {}
    for key, dtype in (("ct", np.float32), ("iph", np.uint8), ("ivh", np.uint8)):
        base = baseline[key].astype(dtype)
        out[key] = np.stack([assemble(base, s.astype(dtype), zs) for s in slices[key]])
    return out


def new_hemorrhage(iph: np.ndarray, ivh: np.ndarray, bl_iph: np.ndarray, bl_ivh: np.ndarray) -> np.ndarray:
    """Voxels hemorrhagic in the sample (IPH or IVH) but outside the baseline IPH ∪ IVH mask (uint8)."""
    return (((iph > 0) | (ivh > 0)) & ~((bl_iph > 0) | (bl_ivh > 0))).astype(np.uint8)


def frequency_map(masks: np.ndarray) -> np.ndarray:
    """Voxel-wise fraction of the masks ``[n, X, Y, Z]`` that are set (float32 in [0, 1])."""
    if len(masks) == 0:
        raise ValueError("a frequency map needs at least one sample")
    return (np.asarray(masks) > 0).mean(axis=0, dtype=np.float64).astype(np.float32)


def mix_maps(per_flag: dict[int, np.ndarray], weights: dict[int, float]) -> np.ndarray:
    """Σ_f w_f · map_f over the flags that have a map, renormalised by Σ w_f of those flags.

    With both flags present and w = {1: p, 0: 1 − p} this is exactly p · map1 + (1 − p) · map0.
    """
    present = [f for f in per_flag if weights.get(f, 0.0) > 0]
    if not present:  # e.g. p = 1 but only flag-0 maps: nothing to weigh, use what exists equally
        present, weights = list(per_flag), dict.fromkeys(per_flag, 1.0)
    total = sum(weights[f] for f in present)
    return (sum(weights[f] * per_flag[f].astype(np.float64) for f in present) / total).astype(np.float32)


def probability_maps(vols: dict[str, np.ndarray], baseline: dict[str, np.ndarray], flags: Sequence[int],
                     weights: dict[int, float]) -> dict[str, np.ndarray]:
    """``{kind}_prob_flag{f}`` per flag with samples and mixed ``{kind}_prob`` for kind in IPH, IVH, new."""
    flags = np.asarray(flags)
    new = np.stack([new_hemorrhage(i, v, baseline["iph"], baseline["ivh"]) for i, v in zip(vols["iph"], vols["ivh"],
                                                                                           strict=True)])
    masks = {"iph": vols["iph"], "ivh": vols["ivh"], "new": new}
    out: dict[str, np.ndarray] = {}
    for kind in MAP_KINDS:
        per_flag = {int(f): frequency_map(masks[kind][flags == f]) for f in (1, 0) if np.any(flags == f)}
        out.update({f"{kind}_prob_flag{f}": m for f, m in per_flag.items()})
        out[f"{kind}_prob"] = mix_maps(per_flag, weights)
    return out


def baseline_volumes(baseline: dict[str, np.ndarray], spacing: Sequence[float]) -> dict[str, float]:
    iph, ivh = mask_volume_ml(baseline["iph"], spacing), mask_volume_ml(baseline["ivh"], spacing)
    return {"iph": iph, "ivh": ivh, "total": iph + ivh}


def volume_table(vols: dict[str, np.ndarray], baseline: dict[str, np.ndarray], plan: FlagPlan,
                 spacing: Sequence[float], meta: dict[str, Any]) -> pd.DataFrame:
    """One row per sample of the split (map-only samples excluded); volumes on the model grid (mL).

    ``expansion`` applies the paper rule (:func:`hemexp.core.clinical.is_expansion`) to the baseline and the
    sample's IPH volume, both measured on the same grid.
    """
    base = baseline_volumes(baseline, spacing)
    rows = []
    for k, flag in enumerate(plan.flags):
        iph = mask_volume_ml(vols["iph"][k], spacing)
        ivh = mask_volume_ml(vols["ivh"][k], spacing)
        new = mask_volume_ml(new_hemorrhage(vols["iph"][k], vols["ivh"][k], baseline["iph"], baseline["ivh"]), spacing)
        rows.append({"patient_id": meta["patient_id"], "variant": meta["variant"], "sample": k, "flag": int(flag),
                     "flag_source": plan.source, "guidance_scale": float(meta["guidance_scale"]), "iph_ml": iph,
                     "ivh_ml": ivh, "total_ml": iph + ivh, "new_ml": new, "expansion": int(is_expansion(base["iph"], iph)),
                     "baseline_iph_ml": base["iph"], "baseline_total_ml": base["total"]})
    return pd.DataFrame(rows, columns=list(VOLUME_COLUMNS))


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """Median and central 80 % interval of sampled volumes (order statistics as :mod:`hemexp.evaluation.calibration`)."""

    lo, hi = empirical_interval(values, INTERVAL_LEVEL)
    return {"median": float(np.median(values)), f"interval_{int(INTERVAL_LEVEL * 100)}": [lo, hi]}


def summarise(table: pd.DataFrame, plan: FlagPlan, baseline_ml: dict[str, float],
              truth_ml: dict[str, float] | None) -> dict[str, Any]:
    """Patient-level numbers: follow-up volume distribution, P(expansion), P(IVH), per-flag rates."""
    by_flag = {int(f): float(g["expansion"].mean()) for f, g in table.groupby("flag")}
    out = {
        "baseline_ml": baseline_ml,
        "followup_ml": {"iph": distribution(table["iph_ml"]), "total": distribution(table["total_ml"])},
        "p_expansion": float(table["expansion"].mean()),
        "p_expansion_by_flag": by_flag,
        "p_ivh": float((table["ivh_ml"] > 0).mean()),
        "flag": plan.to_dict(),
        "true_followup_ml": truth_ml,
        "true_expansion": None if truth_ml is None else bool(is_expansion(baseline_ml["iph"], truth_ml["iph"])),
    }
    return out


# ----------------------------------------------------------------------------- writing


def write_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:

    save_nifti(make_image(data, affine), path)


def write_native(data: np.ndarray, affine: np.ndarray, patient_dir: Path, path: Path, interpolation: str) -> None:
    """Map a model-grid array to the native baseline grid with the patient's transforms and write it."""

    save_nifti(to_native(make_image(data, affine), patient_dir, interpolation), path)


def write_products(out: Path, vols: dict[str, np.ndarray], maps: dict[str, np.ndarray], table: pd.DataFrame,
                   affine: np.ndarray, patient_dir: Path | None) -> dict[str, list[str]]:
    """Write NIfTI samples, maps (model grid, and native when ``patient_dir`` has transforms) and the
    volume table into ``out`` (a folder the caller swaps in atomically); returns the files by kind."""
    files: dict[str, list[str]] = {"samples": [], "maps": [], "native": []}
    n = len(table)
    for k in range(n):
        for key in SAMPLE_STRUCTURES:
            name = SAMPLE_MASK.format(k=k, structure=key)
            write_nifti(vols[key][k], affine, out / name)
            files["samples"].append(name)
    for key, data in maps.items():
        write_nifti(data, affine, out / f"maps/{key}.nii.gz")
        files["maps"].append(f"maps/{key}.nii.gz")
    if patient_dir is not None:
        for k in range(n):
            for key in SAMPLE_STRUCTURES:
                name = f"native/sample_{k:02d}_{key}.nii.gz"
                write_native(vols[key][k], affine, patient_dir, out / name, "linear" if key == "ct" else "label")
                files["native"].append(name)
        for kind in MAP_KINDS:
            write_native(maps[f"{kind}_prob"], affine, patient_dir, out / f"native/{kind}_prob.nii.gz", "linear")
            files["native"].append(f"native/{kind}_prob.nii.gz")
    with atomic_path(out / "volumes.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
    return files



def median_sample(table: pd.DataFrame) -> int:
    """The sample whose total (IPH + IVH) follow-up volume is the median of the samples' (for an even
    count the lower median; equal totals in sample order): one real, coherent sample to show as a binary
    SEG, where an average of masks would be no sample at all."""
    totals = table["total_ml"].to_numpy(dtype=np.float64)
    samples = table["sample"].to_numpy()
    order = np.lexsort((samples, totals))
    return int(samples[order[(len(order) - 1) // 2]])


def dicom_sidecar(table: pd.DataFrame, summary: dict[str, Any], k: int, facts: dict[str, Any]) -> dict[str, Any]:
    """What a DICOM reader needs beside the SEGs: the numbers of summary.json that the SEGs cannot carry."""
    row = table.loc[table["sample"] == k].iloc[0]
    return {"median_sample": k,
            "median_sample_ml": {key: float(row[f"{key}_ml"]) for key in ("iph", "ivh", "total", "new")},
            "baseline_ml": summary["baseline_ml"], "followup_ml": summary["followup_ml"],
            "p_expansion": summary["p_expansion"], "p_expansion_by_flag": summary["p_expansion_by_flag"],
            "p_ivh": summary["p_ivh"], "n_samples": summary.get("n_samples", len(table)),
            "variant": summary.get("variant"), "flag": summary.get("flag"), "seed": summary.get("seed"),
            "guidance_scale": summary.get("guidance_scale"), "volumes_grid": "model", "maps_grid": "native",
            **facts}


def write_dicom_products(out: Path, table: pd.DataFrame, summary: dict[str, Any], native_ct: Path,
                         facts: dict[str, Any]) -> list[str]:
    """``out/dicom/``: the native baseline CT as a de-identified series, the median sample's IPH/IVH as a
    binary SEG and the native probability maps as a fractional SEG (:mod:`hemexp.io.dicom_seg`), from the
    native products :func:`write_products` has just written into ``out``. ``facts`` (model version,
    config hash) go into the sidecar. Returns the written files relative to ``out``."""
    from hemexp.io.dicom_seg import write_dicom_outputs

    pid = str(summary["patient_id"])
    k = median_sample(table)
    data, affine = read_volume(native_ct, pid, what="native baseline CT")
    masks = {key: read_volume(out / f"native/sample_{k:02d}_{key}.nii.gz", pid)[0] for key in ("iph", "ivh")}
    maps = {kind: read_volume(out / f"native/{kind}_prob.nii.gz", pid)[0] for kind in MAP_KINDS}
    write_dicom_outputs(out / DICOM_DIR, make_image(data, affine), masks, maps, pid,
                        dicom_sidecar(table, summary, k, facts))
    return sorted(str(p.relative_to(out)) for p in (out / DICOM_DIR).rglob("*") if p.is_file())
