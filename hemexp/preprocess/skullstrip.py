"""CT skull stripping: a brain mask from a head CT in HU.

Two backends. ``synthstrip`` runs FreeSurfer's ``mri_synthstrip`` (a contrast-agnostic network that
also handles CT) when it is on PATH. ``builtin`` is a morphological CT brain extraction written here
because no maintained Python library does CT brain extraction; it follows the threshold-then-
morphology idea of validated CT pipelines (Muschelli et al. 2015, "Validated automatic brain
extraction of head CT images", NeuroImage 114), replacing BET's surface fit by barriers and
connected components (scipy.ndimage):

1. candidate = brain-like HU (``BRAIN_HU``, which includes fresh blood at 50-90 HU), minus padding
   (the constant value that fills the volume border, e.g. 0 around an already stripped brain);
2. bone (>= ``BONE_HU``) dilated by ``BARRIER_MM`` is removed: a barrier that also covers the
   partial-volume rim of the skull, so scalp and brain do not touch;
3. opening by a ``OPEN_MM`` ball (via Euclidean distance maps, so anisotropic voxels are exact)
   cuts thin bridges (optic nerves, skull-base foramina, scalp leaks);
4. the component kept is the one with most voxels inside the skull (per-slice hole fill of the
   barrier); without any bone (pre-stripped input) simply the largest one;
5. the opened core is grown back inside the candidate, then along non-bone voxels
   (< ``RIM_BONE_HU``, the half-way point between brain and cortical bone) up to ``RIM_MM`` to
   restore the surface the barrier shaved off;
6. holes are filled in 3D and per axial slice, so ventricles, calcifications and hemorrhage
   enclosed by brain stay in the mask;
7. the partial-volume rim of the inner table is peeled (:func:`peel_bone_rim`): voxels brighter
   than ``RIM_HU`` that are connected through bright voxels to the mask's outer surface. Thick
   slices (3-5 mm) average bone from above and below into brain voxels at the vertex and skull
   base (a 1/3-bone voxel reads ~450 HU); steps 2-5 only stop at ``RIM_BONE_HU``, so without this
   the stripped CT shows bright rims. Brain, CSF and acute blood (50-90 HU) stay below
   ``RIM_HU``, so the peel cannot reach into a clot, and bright voxels enclosed by brain stay.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from hemexp.core.errors import PatientInputError
from hemexp.io.nifti import canonical, make_image, save_nifti, spacing_mm

log = logging.getLogger(__name__)

BRAIN_HU = (-10.0, 100.0)
BONE_HU = 300.0
RIM_BONE_HU = 500.0
BARRIER_MM = 2.0
OPEN_MM = 4.0
RIM_MM = 3.0
RIM_HU = 150.0  # above acute blood (<= ~100 HU) plus noise; ~10 % bone in a voxel reads above it
METHODS = ("auto", "builtin", "synthstrip")
SYNTHSTRIP = "mri_synthstrip"
# preprocess.brain_volume_ml is an intracranial-volume (ICV) bound: the strip keeps everything inside the
# inner table (brain, CSF, ventricles, blood). Adult ICV is typically ~1100-1900 mL (males larger, about
# 1300-1900; females about 1100-1600); the real CT template's own intracranial mask is 1920 mL and the
# built-in strip measures template-based heads at ~1995 mL. The default leaves margin for large heads
# and a strip that keeps a little extra CSF, while a mask far outside still flags a failed strip.
VOLUME_RANGE_ML = (700.0, 2400.0)
TYPICAL_ICV_ML = (1100, 1900)


def _dilate(mask: np.ndarray, radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Dilation by a ball of ``radius_mm`` (exact for anisotropic voxels via a distance map)."""
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def _erode(mask: np.ndarray, radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    padded = np.pad(mask, 1)  # the volume border counts as outside
    return (ndimage.distance_transform_edt(padded, sampling=spacing) > radius_mm)[1:-1, 1:-1, 1:-1]


def _padding(hu: np.ndarray) -> np.ndarray:
    """Voxels holding the constant fill value of the volume border, connected to the border.

    Only a value shared by most border voxels counts (0 around a stripped brain, -1024/-3024
    outside a reconstruction circle); real tissue and noisy air never are that uniform.
    """
    border = np.concatenate([f.ravel() for f in (hu[0], hu[-1], hu[:, 0], hu[:, -1], hu[:, :, 0], hu[:, :, -1])])
    values, counts = np.unique(border, return_counts=True)
    if counts.max() < 0.5 * border.size:
        return np.zeros(hu.shape, dtype=bool)
    labels, _ = ndimage.label(hu == values[counts.argmax()])
    on_border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(),
                                          labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    return np.isin(labels, on_border[on_border > 0])


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice (array axis 2 of a canonical image)."""
    out = mask.copy()
    for z in range(mask.shape[2]):
        if out[:, :, z].any():
            out[:, :, z] = ndimage.binary_fill_holes(out[:, :, z])
    return out


def _pick_component(core: np.ndarray, intracranial: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(core)
    if n == 0:
        return core
    index = np.arange(1, n + 1)
    size = ndimage.sum_labels(core, labels, index)
    inside = ndimage.sum_labels(intracranial, labels, index)
    best = index[np.argmax(inside)] if inside.max() > 0 else index[np.argmax(size)]
    return labels == best


def _head_box(tissue: np.ndarray, spacing: tuple[float, ...], margin_mm: float) -> tuple[slice, ...]:
    """Bounding box of non-air voxels plus a margin: the morphology below runs on this crop only."""
    if not tissue.any():
        return tuple(slice(0, n) for n in tissue.shape)
    box = []
    for axis, n in enumerate(tissue.shape):
        hit = np.flatnonzero(tissue.any(axis=tuple(a for a in range(3) if a != axis)))
        pad = int(np.ceil(margin_mm / spacing[axis])) + 1
        box.append(slice(max(0, hit[0] - pad), min(n, hit[-1] + pad + 1)))
    return tuple(box)


def builtin_mask(hu: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Boolean brain mask of a canonical (x, y, z) HU array; steps in the module docstring."""
    padding = _padding(hu)
    box = _head_box((hu >= BRAIN_HU[0]) & ~padding, spacing, OPEN_MM + RIM_MM + BARRIER_MM)
    out = np.zeros(hu.shape, dtype=bool)
    out[box] = _builtin_core(hu[box], padding[box], spacing)
    return out


def _builtin_core(hu: np.ndarray, padding: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    candidate = (hu >= BRAIN_HU[0]) & (hu <= BRAIN_HU[1]) & ~padding
    barrier = _dilate(hu >= BONE_HU, BARRIER_MM, spacing)
    candidate &= ~barrier
    intracranial = _fill_slices(barrier) & ~barrier
    core = _pick_component(_erode(candidate, OPEN_MM, spacing), intracranial)
    if not core.any():
        return core
    mask = _dilate(core, OPEN_MM + 0.5 * min(spacing), spacing) & candidate
    # Geodesic growth through non-bone voxels restores the surface the barrier removed.
    passable = (hu >= BRAIN_HU[0]) & (hu < RIM_BONE_HU) & ~padding
    steps = max(1, int(round(RIM_MM / min(spacing))))
    mask = ndimage.binary_dilation(mask, iterations=steps, mask=passable & _dilate(mask, RIM_MM, spacing))
    mask = _fill_slices(ndimage.binary_fill_holes(mask))
    return peel_bone_rim(mask, hu)


def _outer_layer(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (the volume border counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    return labels == (1 + int(np.argmax(ndimage.sum_labels(mask, labels, np.arange(1, n + 1)))))


def peel_bone_rim(mask: np.ndarray, hu: np.ndarray, rim_hu: float = RIM_HU) -> np.ndarray:
    """Remove the partial-volume rim of the skull from a brain mask; interior hyperdensities stay.

    Peeled: voxels of ``mask`` brighter than ``rim_hu`` that reach the mask's outer layer through
    bright voxels (26-connected components of the bright set that touch the outer layer), i.e. a
    geodesic erosion that follows the inner table however deep its partial-volume streaks go, but
    stops at anything at or below ``rim_hu``: brain, CSF and acute blood (50-90 HU). A clot under
    the skull thus loses only its own bone-contaminated surface voxels, and a hyperdensity enclosed
    by brain (interior clot, calcification) is never reached. The largest remaining component is
    kept and holes are filled again, without filling the peeled voxels back.
    """
    bright = mask & (hu > rim_hu)
    if not bright.any():
        return mask
    labels, _ = ndimage.label(bright, structure=np.ones((3, 3, 3), dtype=bool))
    touching = np.unique(labels[_outer_layer(mask) & bright])
    peel = np.isin(labels, touching[touching > 0])
    if not peel.any():
        return mask
    kept = _largest(mask & ~peel)
    return _largest(_fill_slices(ndimage.binary_fill_holes(kept)) & ~peel)


def synthstrip_mask(ct: nib.Nifti1Image, patient_id: str) -> np.ndarray:
    """Boolean brain mask from ``mri_synthstrip`` on the canonical CT (same grid as ``ct``)."""
    exe = shutil.which(SYNTHSTRIP)
    if exe is None:
        raise RuntimeError(f"preprocess.skullstrip is 'synthstrip' but {SYNTHSTRIP} is not on PATH "
                           "(install FreeSurfer >= 7.3 or SynthStrip, or use 'builtin'/'auto')")
    with tempfile.TemporaryDirectory(prefix="hemexp-synthstrip-") as tmp:
        src, dst = Path(tmp) / "ct.nii.gz", Path(tmp) / "mask.nii.gz"
        save_nifti(ct, src)
        run = subprocess.run([exe, "-i", str(src), "-m", str(dst)], capture_output=True, text=True)
        if run.returncode != 0 or not dst.exists():
            raise RuntimeError(f"{SYNTHSTRIP} failed for patient {patient_id} (exit {run.returncode}): "
                               f"{(run.stderr or run.stdout)[-2000:]}")
        out = canonical(nib.load(str(dst)))
        if out.shape[:3] != ct.shape or not np.allclose(out.affine, ct.affine, atol=1e-3):
            raise RuntimeError(f"{SYNTHSTRIP} returned a mask on a different grid ({out.shape}) than the CT ({ct.shape})")
        return np.asarray(out.dataobj).reshape(ct.shape) > 0


def resolve_method(method: str) -> str:
    """'auto' -> 'synthstrip' when ``mri_synthstrip`` is on PATH, else 'builtin'."""
    if method not in METHODS:
        raise ValueError(f"skull-strip method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "synthstrip" if shutil.which(SYNTHSTRIP) else "builtin"
    return method


def brain_mask(
    ct: nib.Nifti1Image,
    method: str = "auto",
    patient_id: str = "unknown",
    volume_range_ml: tuple[float, float] = VOLUME_RANGE_ML,
) -> tuple[nib.Nifti1Image, dict]:
    """Brain mask (uint8 {0,1}, canonical grid of ``ct``) and an info dict.

    ``info``: ``method`` (backend used), ``brain_volume_ml``, ``volume_range_ml``, ``time_s``.
    A volume outside ``volume_range_ml`` (config ``preprocess.brain_volume_ml``) means the scan is
    not a usable head CT or the extraction failed: :class:`PatientInputError`.
    """
    start = time.perf_counter()
    used = resolve_method(method)
    ct = canonical(ct)
    spacing = spacing_mm(ct)
    if used == "synthstrip":
        mask = synthstrip_mask(ct, patient_id)
    else:
        mask = builtin_mask(np.asarray(ct.get_fdata(dtype=np.float32)), spacing)
    volume = float(mask.sum()) * float(np.prod(spacing)) / 1000.0
    info = {"method": used, "brain_volume_ml": round(volume, 2), "volume_range_ml": list(volume_range_ml),
            "time_s": round(time.perf_counter() - start, 3)}
    log.info("patient %s: brain mask by %s, %.0f mL in %.2f s", patient_id, used, volume, info["time_s"])
    why = volume_problem(volume, volume_range_ml, used)
    if why is not None:
        src = ct.extra.get("source_path") or ct.get_filename()
        raise PatientInputError(patient_id, src, why)
    return make_image(mask.astype(np.uint8), ct.affine), info


def volume_problem(volume_ml: float, volume_range_ml: tuple[float, float], method: str = "builtin") -> str | None:
    """Why a brain-mask volume is implausible (which bound of ``preprocess.brain_volume_ml`` it crossed
    and what that usually means), or None when it is inside the range."""
    lo, hi = volume_range_ml
    typical = f"adult intracranial volume is typically {TYPICAL_ICV_ML[0]}-{TYPICAL_ICV_ML[1]} mL"
    if volume_ml > hi:
        return (f"implausible brain volume {volume_ml:.0f} mL ({method} skull strip): brain mask {volume_ml:.0f} mL is above "
                f"preprocess.brain_volume_ml[1] = {hi:g} mL ({typical}): is the skull strip leaking into the scalp?")
    if volume_ml < lo:
        return (f"implausible brain volume {volume_ml:.0f} mL ({method} skull strip): brain mask {volume_ml:.0f} mL is below "
                f"preprocess.brain_volume_ml[0] = {lo:g} mL ({typical}): partial coverage or a failed strip "
                "(or not a head CT)?")
    return None


def apply_mask(ct: nib.Nifti1Image, mask: nib.Nifti1Image, background_hu: float = 0.0) -> nib.Nifti1Image:
    """Skull-stripped CT: HU inside ``mask``, ``background_hu`` outside (0 like common CT templates)."""
    ct = canonical(ct)
    data = np.where(np.asarray(canonical(mask).dataobj) > 0, ct.get_fdata(dtype=np.float32), background_hu)
    return make_image(data.astype(np.float32), ct.affine)
