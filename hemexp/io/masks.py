"""Hemorrhage mask loading: binary {0,1}, {0,255} and label maps.

Sites export masks differently (ITK-SNAP label maps, binary NIfTI, 0/255 PNG-derived volumes); this is
the one place that turns any of them into a uint8 {0,1} array for IPH or IVH.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


class MaskFormatError(ValueError):
    """A mask file whose values are neither binary nor a label map with the configured labels."""


def binarise_mask(values: np.ndarray, which: str, labels: dict[str, int], label_map: bool) -> np.ndarray:
    """Return uint8 {0,1} for ``which`` ('iph' or 'ivh') from raw mask values.

    ``label_map`` says the same file holds both structures (IPH and IVH columns point at one file);
    then the configured label value selects the structure. Otherwise any of {0,1} or {0,255} is
    accepted, and a file with other values is rejected rather than guessed at.
    """
    if not np.all(np.isfinite(values)):
        raise MaskFormatError("mask contains NaN or infinite values")
    rounded = np.rint(values).astype(np.int64)
    if not np.allclose(rounded, values, atol=1e-3):
        raise MaskFormatError("mask has non-integer values (is this a CT rather than a mask?)")
    uniq = set(np.unique(rounded).tolist())
    if label_map:
        allowed = {0, *labels.values()}
        if not uniq <= allowed:
            raise MaskFormatError(f"label map has values {sorted(uniq)}; expected a subset of {sorted(allowed)}")
        return (rounded == labels[which]).astype(np.uint8)
    if uniq <= {0, 1}:
        return rounded.astype(np.uint8)
    if uniq <= {0, 255}:
        return (rounded == 255).astype(np.uint8)
    raise MaskFormatError(
        f"binary mask expected ({{0,1}} or {{0,255}}) but found values {sorted(uniq)[:8]}; "
        "if this is a label map, point both the IPH and the IVH column at it"
    )


def load_mask_nifti(path: str | Path, which: str, labels: dict[str, int], label_map: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 mask, 4x4 affine) from a NIfTI file, in the file's voxel order."""
    img = nib.load(str(path))
    return binarise_mask(np.asarray(img.dataobj), which, labels, label_map), img.affine


# Geometry tolerances for "this mask was drawn on this CT": float32 sform rounding in mask exports
# (ITK-SNAP, 3D Slicer) moves affine entries by ~1e-5 mm; anything beyond these is a different grid.
AFFINE_ATOL_DIRECTION = 1e-3  # mm per voxel, direction/zoom columns of the affine
AFFINE_ATOL_ORIGIN_FRAC = 0.05  # fraction of the smallest voxel size, for the origin


def grid_mismatch(shape: tuple[int, ...], affine: np.ndarray, ref_shape: tuple[int, ...], ref_affine: np.ndarray) -> str | None:
    """None when two voxel grids coincide within tolerance, else a sentence saying how they differ
    (both shapes, both voxel sizes, largest affine difference) for the error message."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ref_spacing = np.linalg.norm(ref_affine[:3, :3], axis=0)
    direction_diff = float(np.abs(affine[:3, :3] - ref_affine[:3, :3]).max())
    origin_diff = float(np.abs(affine[:3, 3] - ref_affine[:3, 3]).max())
    origin_tol = AFFINE_ATOL_ORIGIN_FRAC * float(ref_spacing.min())
    if tuple(shape) == tuple(ref_shape) and direction_diff <= AFFINE_ATOL_DIRECTION and origin_diff <= origin_tol:
        return None
    fmt = lambda v: "x".join(f"{x:.3g}" for x in v)  # noqa: E731
    return (
        f"mask grid {tuple(shape)} at {fmt(spacing)} mm does not match CT grid {tuple(ref_shape)} at "
        f"{fmt(ref_spacing)} mm (after RAS canonicalisation; largest affine difference: direction "
        f"{direction_diff:.3g} mm, origin {origin_diff:.3g} mm)"
    )
