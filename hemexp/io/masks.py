"""Hemorrhage mask loading: binary {0,1}, {0,255} and label maps.

Sites export masks differently (ITK-SNAP label maps, binary NIfTI, 0/255 PNG-derived volumes); this is
the one place that turns any of them into a uint8 {0,1} array for IPH or IVH, and :func:`read_mask` is
the one mask-file reader every stage uses (site exports and the pipeline's own {0,1} products alike).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hemexp.core.errors import PatientInputError
from hemexp.io.nifti import read_volume


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


def read_mask(path: str | Path, patient_id: str, what: str = "mask", *, which: str = "",
              labels: dict[str, int] | None = None, label_map: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 {0,1} 3D mask, 4x4 affine) of a NIfTI mask file, in its stored voxel order.

    The one mask reader. Without ``labels`` it reads a *pipeline product* (preprocessed, sampled,
    baseline-predicted masks), which this pipeline always writes as {0,1}: any other value means a
    foreign or damaged file and is rejected, not thresholded (a 0/255 file would otherwise be copied
    into nnU-Net's input unchanged). With ``labels`` it reads a *site export* and accepts what
    :func:`binarise_mask` accepts ({0,1}, {0,255}, label maps selected by ``which``).

    Every problem is a :class:`PatientInputError` naming patient, file and problem (``what`` names the
    mask in it): missing, unreadable/truncated, not 3D, NaN/inf, or values of the wrong kind.
    """
    data, affine = read_volume(path, patient_id, what=what)
    if labels is None:
        if np.count_nonzero((data != 0) & (data != 1)):
            values = np.unique(data)[:6].tolist()
            raise PatientInputError(patient_id, path, f"{what} is not binary (values {values}; expected 0 and 1)")
        return data.astype(np.uint8), affine
    try:
        return binarise_mask(data, which, labels, label_map), affine
    except MaskFormatError as err:
        raise PatientInputError(patient_id, path, f"{what}: {err}") from err
