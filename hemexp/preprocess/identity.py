"""Is the follow-up scan the same patient as the baseline? An image-similarity measure after registration.

Brain-mask Dice alone does not separate patients: after an affine registration any two adult brains
overlap (Dice 0.97 for two different synthetic patients). What differs between people is the inside:
ventricle size and shape, sulci, the grey/white pattern. :func:`identity_ncc` is the normalised cross-
correlation (Pearson r) of the two skull-stripped CTs on the model grid, windowed to brain HU and lightly
smoothed (so thick-slice partial volume and noise do not dominate), over the voxels that are brain at
both timepoints and away from the hemorrhage (which legitimately grows, shifts and compresses).
The same head gives r near 1 (noise, slice thickness and growth lower it a little); another head aligned
by the same registration leaves the ventricles and cortex misplaced and gives a clearly lower r.
``scripts/identity_roc.py`` measures the separation; the threshold is ``preprocess.min_identity_ncc``.

Intensity alone is not enough: a smooth warp of one head correlates at 0.98 with the original, and on
the synthetic cohort most other-patient pairs still pass. The stronger cue is the follow-up registration
itself (:func:`affine_scales`): the follow-up is registered rigid then *affine* to the baseline, and a
genuine rescan of the same head needs an affine that is a rigid motion (principal scale factors within
about 1.5 % of 1 in-plane; a hematoma's mass effect does not rescale a skull-bounded brain), whereas another patient's brain differs by several per cent in length, width or height and the
affine takes that up. The decision (:func:`identity_failure`) fails the pair when an in-plane principal
scale leaves ``1 +- preprocess.max_identity_scale_change``, the slice-axis one leaves the looser
``1 +- preprocess.max_identity_slice_scale_change`` (thick slices make the stripped brain's height
uncertain by several per cent), or the NCC falls below ``min_identity_ncc``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

AXES = ("x", "y", "z")

SMOOTH_SIGMA_VOX = 2.0  # Gaussian sigma (voxels of the model grid, 6 mm at 3 mm) applied before correlating
LESION_MARGIN_VOX = 2  # hemorrhage masks dilated by this many voxels are left out
MIN_VOXELS = 100  # fewer common brain voxels: no verdict (NaN)


def identity_region(bl_brain: np.ndarray, fu_brain: np.ndarray, lesions: list[np.ndarray] | None = None,
                    margin_vox: int = LESION_MARGIN_VOX) -> np.ndarray:
    """Voxels that are brain at both timepoints and at least ``margin_vox`` from any lesion mask."""
    region = (np.asarray(bl_brain) > 0) & (np.asarray(fu_brain) > 0)
    if lesions:
        lesion = np.zeros(region.shape, bool)
        for m in lesions:
            lesion |= np.asarray(m) > 0
        if lesion.any() and margin_vox > 0:
            lesion = ndimage.binary_dilation(lesion, iterations=margin_vox)
        region &= ~lesion
    # the outermost brain voxel mixes brain and skull-stripped background: leave it out
    return ndimage.binary_erosion(region, iterations=1) if region.sum() > 8 * MIN_VOXELS else region


def identity_ncc(a: np.ndarray, b: np.ndarray, region: np.ndarray, window: tuple[float, float] = (0.0, 100.0),
                 sigma_vox: float = SMOOTH_SIGMA_VOX) -> float:
    """Normalised cross-correlation (Pearson r, in [-1, 1]) of two co-registered volumes over ``region``.

    Both volumes are clipped to ``window`` (HU) and smoothed by a Gaussian of ``sigma_vox`` voxels
    first. Identical images give 1, an image and its negative -1, independent noise about 0. A constant
    image (no variance in the region) gives 0; fewer than ``MIN_VOXELS`` region voxels give NaN.
    """
    a = np.clip(np.asarray(a, np.float32), *window)
    b = np.clip(np.asarray(b, np.float32), *window)
    region = np.asarray(region, bool)
    if int(region.sum()) < MIN_VOXELS:
        return float("nan")
    if sigma_vox > 0:
        # normalised convolution: smooth inside the region only, so the background does not bleed in
        w = ndimage.gaussian_filter(region.astype(np.float32), sigma_vox)
        w = np.where(w > 1e-6, w, 1.0)
        a = ndimage.gaussian_filter(a * region, sigma_vox) / w
        b = ndimage.gaussian_filter(b * region, sigma_vox) / w
    x, y = a[region].astype(np.float64), b[region].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def identity_measures(vols: dict[str, np.ndarray], window: tuple[float, float]) -> dict[str, float | int]:
    """``{"ncc", "voxels"}`` of model-grid volumes as :func:`hemexp.preprocess.pipeline.resample_timepoint`
    names them (``bl_ct``, ``fu_ct``, ``bl_brain``, ``fu_brain``, ``{bl,fu}_{iph,ivh}``)."""
    lesions = [vols[k] for k in ("bl_iph", "bl_ivh", "fu_iph", "fu_ivh") if k in vols]
    region = identity_region(vols["bl_brain"], vols["fu_brain"], lesions)
    return {"ncc": round(identity_ncc(vols["bl_ct"], vols["fu_ct"], region, window), 4), "voxels": int(region.sum())}


def affine_scales(matrix: np.ndarray) -> dict[str, float]:
    """Principal scale factors of a linear map (3x3), each named by the image axis it is closest to.

    Right polar decomposition ``matrix = R @ S`` (``R`` a rotation, ``S = V diag(s) V^T`` a symmetric
    stretch in the fixed, i.e. baseline, frame): ``s`` are the singular values, the stretch along ``S``'s
    eigenvectors; a rigid motion gives ``s = (1, 1, 1)`` whatever its rotation. Each singular value is
    reported for the axis (``x``, ``y``, ``z``) its eigenvector lies closest to (the assignment maximising
    the summed squared components), so ``diag(1.07, 1, 1)`` after any rotation is ``scale_x 1.07``.
    Also: ``log_det`` (log volume ratio, sum of log scales) and ``anisotropy`` (log max/min scale, the
    shape change a uniform size difference does not explain) and ``max_scale_change`` (max |s - 1|).
    """
    from itertools import permutations

    m = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    _, s, vt = np.linalg.svd(m)
    weight = vt**2  # weight[i, a]: share of singular vector i along axis a
    best = max(permutations(range(3)), key=lambda perm: sum(weight[i, perm[i]] for i in range(3)))
    scales = {AXES[best[i]]: float(s[i]) for i in range(3)}
    logs = np.log(np.maximum(s, 1e-12))
    return {**{f"scale_{a}": scales[a] for a in AXES}, "log_det": float(logs.sum()),
            "anisotropy": float(logs.max() - logs.min()), "max_scale_change": float(np.abs(s - 1.0).max())}


def transform_matrix(mat_path) -> np.ndarray:
    """The 3x3 linear part of an ITK/ANTs ``.mat`` affine transform."""
    import ants

    return np.asarray(ants.read_transform(str(mat_path)).parameters, dtype=np.float64)[:9].reshape(3, 3)


def affine_measures(mat_path) -> dict[str, float]:
    """:func:`affine_scales` of a ``.mat`` (the follow-up -> baseline composite), rounded for the summary."""
    return {k: round(v, 4) for k, v in affine_scales(transform_matrix(mat_path)).items()}


def identity_failure(identity: dict, min_ncc: float | None, max_scale_change: float | None,
                     max_slice_scale_change: float | None = None) -> str | None:
    """Why the follow-up is taken for another patient's head (one phrase), or None when it passes.

    ``identity`` holds ``scale_x/y/z`` (:func:`affine_scales`) and ``ncc`` (:func:`identity_ncc`). The
    in-plane scales (x, y) must lie within ``1 +- max_scale_change``; the slice axis (z) within
    ``1 +- max_slice_scale_change`` (looser: a thick-slice scan's skull strip loses or gains a partial
    slice at the vertex and the skull base, so the brain's height is measured to a few per cent only;
    None: as in-plane); the NCC must reach ``min_ncc`` (a NaN NCC, no common brain, fails). A threshold
    that is None is not applied.
    """
    slice_tol = max_slice_scale_change if max_slice_scale_change is not None else max_scale_change
    for axis, tol in (("x", max_scale_change), ("y", max_scale_change), ("z", slice_tol)):
        value = identity.get(f"scale_{axis}")
        if tol is None or value is None:
            continue
        lo, hi = 1.0 - tol, 1.0 + tol
        if not (lo <= float(value) <= hi):
            key = "max_identity_scale_change" if axis != "z" or max_slice_scale_change is None else \
                "max_identity_slice_scale_change"
            return f"affine scale {float(value):.3f} on {axis} (allowed {lo:.2f}-{hi:.2f}, preprocess.{key})"
    ncc = identity.get("ncc")
    if min_ncc is not None and ncc is not None and not (float(ncc) >= min_ncc):
        return f"brain intensity correlation identity.ncc {float(ncc):.3f} < preprocess.min_identity_ncc {min_ncc}"
    return None
