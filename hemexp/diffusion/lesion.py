"""Lesion weighting of the diffusion loss: a variant's ``lesion_weight: λ`` (training only).

Why: on the validity cohort's training target slices (default law), 55 % of the normalised Δz energy lies
outside the 1-cell neighbourhood of the hematoma. That part is the difference of two scans' noise as
the VAE encodes it: nothing in the condition predicts it, yet it dominates the loss and its gradient.
The expansion flag and the clinical variables act only through the hematoma and its rim. Weighting the
loss there by ``1 + λ`` gives the model's capacity and its gradient steps to the part it can learn.

Why the weight uses the *baseline* mask only: a per-pixel weight ``w`` leaves the minimiser of
``E[w (f - v)^2]`` at the posterior mean ``E[v | x_t, condition]`` only when ``w`` is a function of the
condition. A weight built from the follow-up mask would instead target ``E[w v] / E[w]``, a mean tilted
towards larger follow-up hematomas, and the samples would no longer be drawn from the data's
distribution. The baseline mask is part of the condition, because the model sees the baseline slice.
The one-cell dilation covers the rim the hematoma grows into; a slice whose baseline has no IPH keeps
uniform weights.

Each slice's map is divided by its mean, so the loss keeps its scale: min-SNR weights and the learning
rate mean what they meant before. Written by hand: MONAI's losses weight by class, not by a
condition-derived map.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import grey_dilation

LESION_MARGIN_CELLS = 1  # the rim covered around the baseline hematoma, in latent cells


def near_baseline_hematoma(iph_bl_cells: np.ndarray) -> np.ndarray:
    """Latent cells within :data:`LESION_MARGIN_CELLS` of a cell holding baseline IPH: bool ``[N, h, w]``
    from each cell's baseline IPH share ``[N, h, w]`` (:mod:`hemexp.diffusion.latents`, ``iph_bl_cells``)."""
    cells = np.asarray(iph_bl_cells, dtype=np.float32)
    if cells.ndim != 3:
        raise ValueError(f"iph_bl_cells must be [N, h, w], got shape {cells.shape}")
    size = 2 * LESION_MARGIN_CELLS + 1
    return grey_dilation((cells > 0).astype(np.uint8), size=(1, size, size), mode="constant", cval=0) > 0


def lesion_weight_map(iph_bl_cells: np.ndarray, weight: float) -> np.ndarray:
    """Per-cell loss weights ``[N, 1, h, w]`` (float32, mean 1 per slice): ``1 + weight`` on the cells
    :func:`near_baseline_hematoma`, 1 elsewhere, each slice then divided by its mean. ``weight = 0``
    gives uniform weights."""
    return weights_from_near(near_baseline_hematoma(iph_bl_cells), weight)


def weights_from_near(near: np.ndarray, weight: float) -> np.ndarray:
    """:func:`lesion_weight_map` from an already computed :func:`near_baseline_hematoma` mask ``[N, h, w]``."""
    if weight < 0:
        raise ValueError(f"lesion_weight must be >= 0, got {weight}")
    raw = 1.0 + float(weight) * np.asarray(near, dtype=np.float32)
    return (raw / raw.mean(axis=(1, 2), keepdims=True))[:, None].astype(np.float32)
