"""Out-of-distribution gate: how far one input lies from the data the models were trained on.

A simulator asked a clinical question about a scan unlike its training scans answers anyway, and
nothing in its samples says so. Before sampling, ``hemexp sample`` and ``hemexp simulate`` score the
input against the *training envelope* (:func:`fit_envelope`, fitted on the training split by
``hemexp fit-ood`` into ``models/ood/envelope.json``) and write the scores into ``summary.json``
under ``ood``; each score outside its fitted range becomes a warning (stderr and the summary).

Scored features (one number each, see :data:`FEATURES`): native slice thickness and field of view,
image noise in brain parenchyma, how well the registered baseline sits on the template, the frozen
VAE's reconstruction error of the baseline slices and the RMS of their normalised latents (with its
percentile among training patients). Clinical values are checked against the training range of
each variable and reported with the value the model actually receives after clamping.

Thresholds are fitted on the training split, distribution-free: per feature the training extremes
widened by ``margin`` x the training range (floored at ``rel_floor`` x |median|, so a cohort scanned
with one slice thickness still has a usable range). Training patients therefore never warn; a new
in-distribution patient exceeds the training maximum with probability 1/(n+1), and the margin
makes a warning rarer still. Each score also carries its robust z (median, 1.4826 MAD) and its
percentile among training patients, so a reader sees how unusual an input is, not only whether it
crossed a line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from hemexp.core.clinical import CLINICAL_BY_NAME, CLINICAL_NAMES

ENVELOPE_VERSION = 1


@dataclass(frozen=True)
class Feature:
    """One scored input property: ``side`` says which direction is out of distribution."""

    name: str
    side: str  # "both" | "high" | "low"
    unit: str
    meaning: str


FEATURES: tuple[Feature, ...] = (
    Feature("native_slice_thickness_mm", "both", "mm", "native slice thickness of the baseline CT"),
    Feature("native_fov_mm", "both", "mm", "native in-plane field of view (mean of x and y extent)"),
    Feature("noise_hu", "both", "HU", "image noise in brain parenchyma (robust, from neighbour differences)"),
    Feature("template_brain_dice", "low", "", "Dice of the registered brain with the template brain"),
    Feature("template_ncc", "low", "", "intensity correlation of the registered baseline with the template"),
    Feature("template_centroid_offset_mm", "high", "mm", "distance of brain and template centroids"),
    Feature("vae_recon_mae_hu", "high", "HU", "VAE reconstruction error of the sampled baseline slices (brain)"),
    Feature("latent_rms", "both", "", "RMS of the normalised baseline latents of the sampled slices"),
)
FEATURE_BY_NAME = {f.name: f for f in FEATURES}


# ----------------------------------------------------------------------------- feature extraction


def image_noise_hu(ct_hu: np.ndarray, brain: np.ndarray, hu_range: tuple[float, float] = (-100.0, 200.0)) -> float:
    """Noise SD (HU) inside the brain from in-plane neighbour differences d: sqrt(trimmed E[d^2] / 2).

    Neighbour differences cancel the smooth anatomy at CT pixel sizes and keep the noise. Pairs with
    |d| beyond 3 robust SDs (edges, the hematoma border) are dropped and the second moment corrected
    for that normal truncation (factor 0.9733); a MAD alone would be quantised by integer HU. Only
    pairs inside the eroded brain and within ``hu_range`` (no bone, no air) count. NaN below 100 pairs.
    """
    ct = np.asarray(ct_hu, dtype=np.float32)
    inner = ndimage.binary_erosion(np.asarray(brain) > 0, structure=np.ones((3, 3, 1), bool))
    keep = inner & (ct >= hu_range[0]) & (ct <= hu_range[1])
    diffs = []
    for axis in (0, 1):
        pair = keep & np.roll(keep, -1, axis=axis)
        last = [slice(None)] * 3
        last[axis] = slice(-1, None)
        pair[tuple(last)] = False  # np.roll wraps around: the last row has no neighbour
        diffs.append((np.roll(ct, -1, axis=axis) - ct)[pair])
    d = np.concatenate(diffs).astype(np.float64)
    if d.size < 100:
        return float("nan")
    d = d - np.median(d)
    scale = max(1.4826 * float(np.median(np.abs(d))), float(np.mean(np.abs(d))))
    kept = d[np.abs(d) <= 3.0 * scale]
    return float(np.sqrt(np.mean(kept**2) / 0.97334 / 2.0))


def native_features(ct: Any, brain: np.ndarray) -> dict[str, float]:
    """Acquisition features of a native (ingested) baseline CT image (nibabel) and its brain mask."""
    from hemexp.io.nifti import spacing_mm

    sp = spacing_mm(ct)
    shape = ct.shape
    return {
        "native_slice_thickness_mm": round(float(sp[2]), 4),
        "native_fov_mm": round(float((shape[0] * sp[0] + shape[1] * sp[1]) / 2.0), 3),
        "noise_hu": round(image_noise_hu(np.asarray(ct.dataobj, dtype=np.float32), brain), 4),
    }


def registration_features(template_similarity: Mapping[str, float] | None) -> dict[str, float]:
    """The template-fit numbers of ``summary.json`` (``registration.template_similarity``) as features."""
    sim = template_similarity or {}
    return {f"template_{k}": float(sim[k]) for k in ("brain_dice", "ncc", "centroid_offset_mm") if k in sim}


def model_features(vae: Any, stats: Mapping[str, Any], baseline: Mapping[str, np.ndarray], spacing_z: float,
                   z_margin_mm: float, hu_window: Sequence[float], device: Any) -> dict[str, float]:
    """VAE reconstruction error (HU, brain voxels) and normalised-latent RMS of the slices sampling uses.

    The slices are those :func:`hemexp.sampling.sampler.sampled_slices` picks (baseline IPH z-extent
    ± margin), encoded and decoded exactly as sampling does, so a training patient and a new patient
    are measured the same way. A scan the VAE cannot reconstruct, or whose latents sit where training
    latents never did, gives samples built on a poor latent baseline.
    """
    import torch

    from hemexp.diffusion.latents import normalise
    from hemexp.sampling.sampler import decode, encode, sampled_slices, slice_stack
    from hemexp.vae.data import unwindow_ct

    zs = sampled_slices(baseline["iph"], spacing_z, z_margin_mm)
    images = slice_stack(baseline["ct"], baseline["iph"], baseline["ivh"], zs, hu_window)
    device = torch.device(device)
    z = encode(vae, images, device)
    ct01, _, _ = decode(vae, z, device, 0.5)
    truth = np.stack([baseline["ct"][:, :, int(k)] for k in zs]).astype(np.float32)
    recon = unwindow_ct(ct01, hu_window).reshape(truth.shape)
    brain = truth > 0  # skull-stripped model-grid CT: background is exactly 0 HU
    clip = np.clip(truth, *hu_window)
    mae = float(np.abs(recon - clip)[brain].mean()) if brain.any() else float("nan")
    rms = float(torch.sqrt((normalise(z, dict(stats)) ** 2).mean()).item())
    return {"vae_recon_mae_hu": round(mae, 4), "latent_rms": round(rms, 5)}


# ----------------------------------------------------------------------------- envelope


def _quantile_rank(values: Sequence[float], x: float) -> float:
    """Percent of training values below ``x`` (ties count half): the feature's training percentile."""
    v = np.asarray(values, dtype=float)
    return float(100.0 * ((v < x).sum() + 0.5 * (v == x).sum()) / len(v))


def fit_feature(values: Sequence[float], side: str, margin: float, rel_floor: float) -> dict[str, Any]:
    """Fitted range of one feature: the training extremes widened by ``margin`` x the training range
    (floored at ``rel_floor`` x |median|); None on a side that cannot be out of distribution."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"n": 0}
    med = float(np.median(v))
    spread = max(float(v.max() - v.min()), rel_floor * abs(med), 1e-6)
    sigma = max(1.4826 * float(np.median(np.abs(v - med))), spread / 4.0)  # robust SD, for the reported z
    lo = float(v.min()) - margin * spread if side in ("both", "low") else None
    hi = float(v.max()) + margin * spread if side in ("both", "high") else None
    return {"n": int(len(v)), "median": med, "sigma": sigma, "lo": lo, "hi": hi,
            "min": float(v.min()), "max": float(v.max()), "values": [round(float(x), 6) for x in v]}


def fit_envelope(feature_rows: Sequence[Mapping[str, float]], clinical_rows: Sequence[Mapping[str, float]],
                 margin: float = 0.25, rel_floor: float = 0.05, patients: Sequence[str] = ()) -> dict[str, Any]:
    """The training envelope: per-feature fitted ranges and per-variable clinical training ranges."""
    features = {f.name: fit_feature([r.get(f.name) for r in feature_rows], f.side, margin, rel_floor)
                for f in FEATURES}
    clinical = {}
    for name in CLINICAL_NAMES:
        vals = [float(r[name]) for r in clinical_rows if name in r]
        if vals:
            clinical[name] = {"min": min(vals), "max": max(vals)}
    return {"version": ENVELOPE_VERSION, "n_patients": len(feature_rows), "patients": list(patients),
            "margin": margin, "rel_floor": rel_floor, "features": features, "clinical": clinical}


# ----------------------------------------------------------------------------- scoring


def _score_feature(name: str, value: float | None, fitted: Mapping[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    feat = FEATURE_BY_NAME[name]
    row: dict[str, Any] = {"value": value, "unit": feat.unit}
    if value is None or not np.isfinite(value) or not fitted or not fitted.get("n"):
        row["status"] = "not scored"
        return row, None
    lo, hi = fitted.get("lo"), fitted.get("hi")
    row.update(lo=lo, hi=hi, training_median=fitted["median"],
               robust_z=round((value - fitted["median"]) / fitted["sigma"], 3),
               training_percentile=round(_quantile_rank(fitted["values"], value), 1))
    outside = (lo is not None and value < lo) or (hi is not None and value > hi)
    row["status"] = "outside" if outside else "ok"
    if not outside:
        return row, None
    bound = f"< {lo:.4g}" if lo is not None and value < lo else f"> {hi:.4g}"
    return row, (f"{feat.meaning}: {value:.4g}{feat.unit and ' ' + feat.unit} {bound} (training median "
                 f"{fitted['median']:.4g}, robust z {row['robust_z']:+.1f})")


def _score_clinical(given: Mapping[str, float], requested: Mapping[str, float] | None,
                    ranges: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, Any], list[str]]:
    """Each clinical value as given, as requested by a scenario, and as the model receives it (clamped to
    :data:`hemexp.core.clinical.CLINICAL_VARIABLES`' range), checked against the training range."""
    rows, warnings = {}, []
    for name in CLINICAL_NAMES:
        if name not in given:
            continue
        var = CLINICAL_BY_NAME[name]
        asked = float((requested or given).get(name, given[name]))
        model_value = min(max(asked, var.low), var.high)
        row: dict[str, Any] = {"given": float(given[name]), "requested": asked, "model_value": model_value,
                               "clamped": model_value != asked}
        if name in ranges:
            lo, hi = ranges[name]["min"], ranges[name]["max"]
            row.update(training_min=lo, training_max=hi, outside=bool(asked < lo or asked > hi))
            if row["outside"]:
                warnings.append(f"clinical {name} = {asked:g} outside the training range [{lo:g}, {hi:g}]")
        if row["clamped"]:
            warnings.append(f"clinical {name} = {asked:g} clamped to the model range [{var.low:g}, {var.high:g}]: "
                            f"the model sees {model_value:g}")
        rows[name] = row
    return rows, warnings


def score_input(features: Mapping[str, float | None], clinical_given: Mapping[str, float],
                envelope: Mapping[str, Any] | None, clinical_requested: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The ``ood`` block of ``summary.json``: every feature's value, fitted range, robust z, training
    percentile and status, the clinical checks, and the warnings (empty = inside the training envelope).

    ``clinical_requested``: the values after a scenario (``--set``), before clamping to the model range.
    Without an envelope (a model folder from before the gate) values are recorded but not judged.
    """
    fitted = (envelope or {}).get("features", {})
    rows, warnings = {}, []
    for feat in FEATURES:
        row, warning = _score_feature(feat.name, features.get(feat.name), fitted.get(feat.name))
        rows[feat.name] = row
        if warning:
            warnings.append(warning)
    clinical, clinical_warnings = _score_clinical(clinical_given, clinical_requested, (envelope or {}).get("clinical", {}))
    if envelope is None:
        warnings = ["no training envelope (models/ood/envelope.json; run hemexp fit-ood): input not checked"]
    return {"envelope": None if envelope is None else {"n_patients": envelope["n_patients"],
                                                       "margin": envelope["margin"]},
            "features": rows, "clinical": clinical, "warnings": warnings + clinical_warnings,
            "in_distribution": envelope is not None and not warnings and not any(
                c.get("outside") for c in clinical.values())}


# ----------------------------------------------------------------------------- pipeline patients


def pipeline_input_features(cfg: Mapping[str, Any], patient_id: str, summary: Mapping[str, Any]) -> dict[str, float]:
    """The features of one preprocessed workflow patient measured without the VAE: native scan and brain
    mask from ``ingested/{p}/``, template fit from its ``summary.json``. One function for ``fit-ood``
    (training patients) and ``sample`` (test patients), so both are measured alike."""
    import nibabel as nib

    from hemexp.core.layout import Layout

    layout = Layout.of(dict(cfg))
    ct_path, brain_path = layout.native_baseline_ct(patient_id), layout.native_baseline_brain(patient_id)
    native: dict[str, float] = {}
    if ct_path.is_file() and brain_path.is_file():  # absent only in results folders assembled by hand
        native = native_features(nib.load(str(ct_path)), np.asarray(nib.load(str(brain_path)).dataobj) > 0)
    return {**native, **registration_features(summary.get("registration", {}).get("template_similarity"))}


@dataclass(frozen=True)
class OodRequest:
    """What the gate needs besides the model-grid baseline: the features measured before sampling
    (acquisition, template fit), the clinical values as given and as requested by a scenario, and the
    training envelope's file (None: values recorded, not judged)."""

    features: Mapping[str, float]
    clinical_given: Mapping[str, float]
    clinical_requested: Mapping[str, float] | None
    envelope: Any  # Path | None


def score_baseline(request: OodRequest, vae: Any, stats: Mapping[str, Any], baseline: Mapping[str, np.ndarray],
                   spacing_z: float, z_margin_mm: float, hu_window: Sequence[float], device: Any) -> dict[str, Any]:
    """The ``ood`` block of one patient about to be sampled: ``request``'s features plus the VAE features
    of its loaded baseline (:func:`model_features`), scored against the envelope (:func:`score_input`)."""
    from hemexp.core.files import read_json

    features = {**request.features, **model_features(vae, stats, baseline, spacing_z, z_margin_mm, hu_window, device)}
    envelope = read_json(request.envelope) if request.envelope is not None else None
    return score_input(features, request.clinical_given, envelope, request.clinical_requested)


def warn(scores: Mapping[str, Any], patient_id: str) -> None:
    """Print the gate's warnings for one patient on stderr (the summary keeps them too)."""
    import sys

    for message in scores["warnings"]:
        print(f"hemexp: OOD warning for {patient_id}: {message}", file=sys.stderr)
