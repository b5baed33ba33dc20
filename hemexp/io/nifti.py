"""NIfTI reading and writing with the checks and header hygiene every stage relies on.

Reading validates what nibabel does not: that the file exists, decompresses completely (a truncated
``.nii.gz`` loads lazily and only fails when the voxels are read), has a usable voxel-to-world affine
(finite, non-singular, plausible voxel sizes: nibabel loads a degenerate sform and only fails later,
deep inside reorientation), is a 3D volume and holds finite numbers. Writing goes through :func:`hemexp.core.files.atomic_path` and blanks every free-text header
field (``descrip``, ``aux_file``, ``intent_name``, ``db_name``) and drops header extensions, so no
DICOM-derived text (or anything else identifying) can ride along into a product.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from hemexp.core.errors import PatientInputError
from hemexp.core.files import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Header fields that can carry free text; cleared on every write.
TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name")
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError,
                nib.spatialimages.HeaderDataError)


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def affine_spacing_mm(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along the three array axes: the lengths of the affine's first three columns.

    The one spacing definition of the pipeline (volumes, surface distances, z steps all use it), so
    a mask and its reference are always measured alike; valid for oblique and flipped grids.
    """
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def spacing_mm(img: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel size (mm) of an image, from its affine (not the possibly stale pixdim)."""
    return affine_spacing_mm(img.affine)


# Same-grid tolerances. Every grid in the pipeline is written by nibabel, which stores the sform in
# float32: a round trip moves affine entries by ~1e-7 relative (~1e-5 mm at a 100 mm origin), and mask
# exports (ITK-SNAP, 3D Slicer) round the same way. A real mismatch (another scan, a stale prediction,
# a crop) moves the origin by at least a fraction of a voxel or changes a voxel size/direction by far
# more than 1e-3. So: direction/zoom columns within 1e-3 mm per voxel, origin within 5 % of the
# smallest voxel (a plain 1e-3 mm origin tolerance would reject float noise from a far-away origin).
AFFINE_ATOL_DIRECTION = 1e-3  # mm per voxel, direction/zoom columns of the affine
AFFINE_ATOL_ORIGIN_FRAC = 0.05  # fraction of the smallest reference voxel size, for the origin


def grid_mismatch(shape: tuple[int, ...], affine: np.ndarray, ref_shape: tuple[int, ...], ref_affine: np.ndarray,
                  what: str = "mask", ref_what: str = "CT", context: str = "") -> str | None:
    """None when two voxel grids coincide within the tolerances above, else a sentence saying how they
    differ (both shapes, both voxel sizes, largest affine difference) for the error message.

    ``what``/``ref_what`` name the two grids in that sentence; ``context`` (e.g. "after RAS
    canonicalisation") is prepended to the parenthesis.
    """
    affine, ref_affine = np.asarray(affine, dtype=np.float64), np.asarray(ref_affine, dtype=np.float64)
    spacing, ref_spacing = affine_spacing_mm(affine), affine_spacing_mm(ref_affine)
    direction_diff = float(np.abs(affine[:3, :3] - ref_affine[:3, :3]).max())
    origin_diff = float(np.abs(affine[:3, 3] - ref_affine[:3, 3]).max())
    origin_tol = AFFINE_ATOL_ORIGIN_FRAC * min(ref_spacing)
    if tuple(shape) == tuple(ref_shape) and direction_diff <= AFFINE_ATOL_DIRECTION and origin_diff <= origin_tol:
        return None
    fmt = lambda v: "x".join(f"{x:.3g}" for x in v)  # noqa: E731
    return (
        f"{what} grid {tuple(shape)} at {fmt(spacing)} mm does not match {ref_what} grid {tuple(ref_shape)} at "
        f"{fmt(ref_spacing)} mm ({context + '; ' if context else ''}largest affine difference: direction "
        f"{direction_diff:.3g} mm, origin {origin_diff:.3g} mm)"
    )


# A CT voxel is 0.1-10 mm; outside these bounds the header geometry is broken, not unusual.
VOXEL_MM_RANGE = (0.01, 50.0)
MIN_AXIS_ORTHOGONALITY = 1e-3  # |det| / product of voxel sizes: 0 when two voxel axes are parallel


def affine_problem(affine: np.ndarray) -> str | None:
    """None for a usable voxel-to-world affine, else why it is not (non-finite, singular or collinear
    axes, implausible voxel size): the text of the error :func:`read_volume` raises."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return "voxel-to-world affine (sform/qform) has NaN/inf entries"
    spacing = affine_spacing_mm(affine)
    if min(spacing) <= 0 or abs(np.linalg.det(affine[:3, :3])) < MIN_AXIS_ORTHOGONALITY * float(np.prod(spacing)):
        return (f"voxel-to-world affine (sform/qform) is singular (voxel sizes {', '.join(f'{v:.3g}' for v in spacing)}"
                " mm, axes degenerate)")
    lo, hi = VOXEL_MM_RANGE
    if not all(lo <= v <= hi for v in spacing):
        return f"implausible voxel size {'x'.join(f'{v:.3g}' for v in spacing)} mm in the affine (expected {lo:g}-{hi:g} mm)"
    return None


def read_volume(path: str | Path, patient_id: str, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """(float32 3D array, 4x4 affine) of a NIfTI file in its stored voxel order.

    Every way the file can be unusable becomes a :class:`PatientInputError` naming the file: missing,
    not NIfTI, empty (0 bytes), truncated/corrupt (detected by reading all voxels), a broken affine
    (:func:`affine_problem`), not 3D (a trailing singleton dimension is accepted), or containing NaN/inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise PatientInputError(patient_id, path, f"{what} file not found")
    if not path.is_file():
        raise PatientInputError(patient_id, path, f"{what} is not a file (expected a NIfTI .nii/.nii.gz)")
    if path.stat().st_size == 0:
        raise PatientInputError(patient_id, path, f"{what} file is empty (0 bytes): re-export or re-copy it")
    try:
        img = nib.load(str(path))
        affine = np.asarray(img.affine, dtype=np.float64)
    except _READ_ERRORS as err:
        raise PatientInputError(
            patient_id, path, f"{what} is truncated or corrupt: cannot read its header ({type(err).__name__}: {err})"
        ) from err
    problem = affine_problem(affine)
    if problem:
        raise PatientInputError(patient_id, path, f"{what} {problem}: fix the header geometry or re-export the scan")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except _READ_ERRORS as err:
        raise PatientInputError(
            patient_id, path, f"{what} is truncated or corrupt: cannot read it ({type(err).__name__}: {err}); "
            "re-export or re-copy the file"
        ) from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise PatientInputError(patient_id, path, f"{what} must be a 3D volume, got {data.ndim}D data of shape "
                                f"{data.shape} (a single slice, or a 4D time series / multi-volume file?)")
    if min(data.shape) < 2:
        raise PatientInputError(patient_id, path, f"{what} must be a 3D volume, got shape {data.shape} "
                                "(a single slice, not a volume)")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise PatientInputError(
            patient_id, path, f"{what} has {bad} NaN/inf voxels ({100.0 * bad / data.size:.2g} % of the volume): "
            "not a valid image; re-export it"
        )
    return data, affine


def make_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A fresh NIfTI image (new header: nothing inherited from a source file), sform = qform = affine."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img


def canonical(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """RAS+ closest-canonical orientation (array axes x, y, z = right, anterior, superior)."""
    return nib.as_closest_canonical(img)


def sanitise_header(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Blank the free-text header fields and drop extensions, in place; returns ``img``."""
    hdr = img.header
    for field in TEXT_FIELDS:
        if field in hdr:
            hdr[field] = b""
    hdr.extensions.clear()
    return img


def save_nifti(img: nib.Nifti1Image, path: str | Path, dtype: type | np.dtype | None = None) -> Path:
    """Write ``img`` atomically with a sanitised header; ``dtype`` converts the data first.

    A new image is built from data + affine, so the on-disk header holds geometry only.
    """
    data = np.asanyarray(img.dataobj)
    if dtype is not None:
        data = data.astype(dtype)
    out = sanitise_header(make_image(data, img.affine))
    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"NIfTI output must end in .nii or .nii.gz: {path}")
    with atomic_path(path) as tmp:
        nib.save(out, str(tmp))
    return path
