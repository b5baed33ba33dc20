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
