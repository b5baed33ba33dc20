"""Ingest: a raw CT (DICOM folder or NIfTI file) or hemorrhage mask -> canonical RAS+ NIfTI image.

This is the boundary where site data becomes pipeline data, so every problem with a patient's input
surfaces here as a :class:`~hemexp.core.errors.PatientInputError` naming patient, file and problem, and
every image leaves in one convention: RAS+ closest-canonical orientation (``nib.as_closest_canonical``),
CT float32 HU clipped to ``HU_RANGE``, masks uint8 {0, 1} on exactly the CT's grid (a mask saved on
another grid of the same physical space, or a DICOM SEG, is resampled onto it and checked:
:mod:`hemexp.io.masks`).

Returned images carry (in ``img.extra``, never written to disk) ``source_path`` and ``ingest``, a
dict of safe facts about the source (format, shape, spacing, for DICOM the chosen series'
:class:`hemexp.io.dicom.SeriesInfo`, selection reason and resampling warnings).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from hemexp.core.errors import PatientInputError
from hemexp.io.dicom import load_dicom_folder
from hemexp.io.masks import (
    check_resampled,
    foreground_world,
    is_dicom_seg_path,
    read_mask,
    read_seg,
    resample_nearest,
    voxel_volume_mm3,
)
from hemexp.io.nifti import canonical, grid_mismatch, is_nifti_path, make_image, read_volume, spacing_mm

# Air is -1000 HU; scanners pad outside the reconstruction circle with -2000/-3024 and clip at
# 3071 (12-bit). Clipping to this range makes padding look like air to registration and templates.
HU_RANGE = (-1024.0, 3071.0)
MASK_KINDS = ("iph", "ivh")
# A hemorrhage is a few percent of a head CT; a mask over more than this share of the volume is an
# inverted mask, a wrong label value or another image, never a bleed.
MAX_MASK_FRACTION = 0.5


def _check_hu(data: np.ndarray, path: Path, patient_id: str) -> None:
    """Reject volumes that cannot be a CT in Hounsfield units (constant, or no negative values)."""
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise PatientInputError(patient_id, path, f"CT volume is constant ({lo:g}); no image content")
    if lo >= 0:
        raise PatientInputError(
            patient_id, path,
            f"no negative values (range {lo:g}..{hi:g}): not a CT in Hounsfield units "
            "(an MR image, or stored values without RescaleIntercept?)",
        )


def _series_hint(mask_shape: tuple[int, ...], ingest: dict) -> str:
    """For a DICOM folder holding more than one usable series: which series the mask would fit."""
    usable = ingest.get("usable_series") or []
    if len(usable) < 2:
        return ""
    chosen = usable[0]
    fits = [u for u in usable[1:] if sorted(u["grid"]) == sorted(mask_shape)]
    which = (f"; the mask's shape fits series {fits[0]['series_number']} instead" if fits else "")
    return (f"; the CT folder holds {len(usable)} usable series (two series or more in one folder; chosen: series "
            f"{chosen['series_number']}, {chosen['kernel_class']} kernel){which}: keep only the series the masks were "
            "drawn on in the folder")


def load_ct(path: str | Path, patient_id: str) -> nib.Nifti1Image:
    """Load a CT from a DICOM folder or a NIfTI file as a canonical RAS+ float32 HU image.

    DICOM folders go through :func:`hemexp.io.dicom.load_dicom_folder` (series selection, rescale,
    tilt and spacing correction). Raises :class:`PatientInputError` for a missing/truncated/corrupt
    file, non-finite voxels, a non-CT modality, a localizer-only folder or no usable axial series.
    """
    path = Path(path)
    if not path.exists():
        raise PatientInputError(patient_id, path, "CT not found (expected a DICOM folder or a NIfTI file)")
    if path.is_dir():
        data, affine, info = load_dicom_folder(path, patient_id)
        info = {"format": "dicom", **info}
    elif is_nifti_path(path):
        data, affine = read_volume(path, patient_id, what="CT")
        info = {"format": "nifti", "warnings": []}
    else:
        raise PatientInputError(patient_id, path, "CT must be a DICOM folder or a .nii/.nii.gz file")
    if not np.all(np.isfinite(data)):
        raise PatientInputError(patient_id, path, "CT has NaN/inf voxels")
    _check_hu(data, path, patient_id)
    data = np.clip(data, *HU_RANGE).astype(np.float32, copy=False)
    img = canonical(make_image(data, affine))
    img = make_image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    info.update(shape=list(img.shape), spacing_mm=list(spacing_mm(img)), hu_clip=list(HU_RANGE))
    img.extra.update(source_path=str(path), ingest=info)
    return img


def load_mask(
    path: str | Path,
    reference_ct: nib.Nifti1Image,
    which: str,
    labels: dict[str, int],
    label_map: bool,
    patient_id: str,
    reference_path: str | Path | None = None,
) -> nib.Nifti1Image:
    """Load an IPH or IVH mask as a canonical uint8 {0,1} image on the grid of ``reference_ct``.

    Accepts {0,1}, {0,255} and label maps (``label_map=True``: ``labels[which]`` selects the
    structure); see :func:`hemexp.io.masks.binarise_mask`. A NIfTI mask on exactly the CT's grid
    (shape and affine after canonicalisation, tolerances in :mod:`hemexp.io.nifti`) is taken as it is.
    A mask on any other grid of the same physical space (dcm2niix's conversion of a tilted series,
    another reconstruction of the study), or a DICOM SEG file (the segment labelled IPH/IVH or numbered
    ``labels[which]``), is resampled nearest-neighbour in world coordinates onto the CT grid and must
    lie inside the CT's field of view and keep its volume (:func:`hemexp.io.masks.check_resampled`);
    otherwise the error names the file, the problem, both grids and the CT file. ``reference_path``
    defaults to the CT's ``extra["source_path"]`` set by :func:`load_ct`. The returned image's
    ``extra["mask_ingest"]`` says whether (and how) it was resampled.
    """
    if which not in MASK_KINDS:
        raise ValueError(f"which must be one of {MASK_KINDS}, got {which!r}")
    path = Path(path)
    what = f"{which.upper()} mask"
    ref = canonical(reference_ct)
    ref_file = reference_path or reference_ct.extra.get("source_path") or reference_ct.get_filename()
    hint = f"; CT file: {ref_file or 'unknown'}" + _series_hint((), reference_ct.extra.get("ingest", {}))
    if is_dicom_seg_path(path):
        seg = read_seg(path, patient_id, what, which, labels, label_map)
        data = seg.resample(ref.shape, ref.affine)
        facts = check_resampled(patient_id, path, what, seg.volume_ml(), seg.voxel_ml(), seg.points_ras(), data,
                                ref.affine, grid_text=f"DICOM SEG of {len(seg.frames)} frame(s){hint}")
        facts["format"] = "dicom-seg"
    else:
        binary, affine = read_mask(path, patient_id, what, which=which, labels=labels, label_map=label_map)
        img = canonical(make_image(binary, affine))
        problem = grid_mismatch(img.shape, img.affine, ref.shape, ref.affine, context="after RAS canonicalisation")
        data = np.asarray(img.dataobj, dtype=np.uint8)
        facts = {"format": "nifti", "resampled": False}
        if problem:
            hint = f"; CT file: {ref_file or 'unknown'}" + _series_hint(binary.shape, reference_ct.extra.get("ingest", {}))
            source_ml = float(np.count_nonzero(data)) * voxel_volume_mm3(img.affine) / 1000.0
            points = foreground_world(data, img.affine)
            data = resample_nearest(data, img.affine, ref.shape, ref.affine)
            facts.update(check_resampled(patient_id, path, what, source_ml, voxel_volume_mm3(img.affine) / 1000.0,
                                         points, data, ref.affine, grid_text=f"{which.upper()} {problem}{hint}"))
            facts["format"] = "nifti"
    fraction = float(data.mean())
    if fraction > MAX_MASK_FRACTION:
        extent = "the whole volume" if fraction >= 0.999 else f"{100 * fraction:.0f} % of the volume"
        raise PatientInputError(patient_id, path, f"{which.upper()} mask covers {extent}: not a hemorrhage "
                                "segmentation (an inverted mask, a wrong label value, or the CT instead of the mask?)")
    # Snap to the CT's affine so later resampling treats both as exactly one grid.
    out = make_image(data, ref.affine)
    out.extra.update(source_path=str(path), mask_ingest=facts)
    return out
