"""Per-patient QC figure: what a reader checks before trusting a preprocessed pair.

Row 1: baseline CT on the model grid with IPH (red) and IVH (blue) contours — are the masks on the
bleed? Row 2: the registered follow-up with its own contours — did the pair survive resampling? Row 3:
a checkerboard of baseline and follow-up tiles with both brain outlines (baseline green, follow-up
yellow) — misregistration shows as broken edges at tile borders and separated outlines. Row 4 (when
the template mask is given): the registered baseline in three planes (axial, coronal, sagittal through
the template brain's centroid) with the template's brain outline (cyan; the template mask resampled
onto the model grid, which is defined in template space) and the baseline's own brain outline (green)
— did the head land on the template? (summary.json ``registration.template``: Dice, NCC, centroid offset.)
Slices are spread over the brain's z-extent and always include the slice with the largest baseline IPH.
Images are shown in neurological convention (patient's right on the image's right, anterior up).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hemexp.core.files import save_figure  # noqa: E402

N_SLICES = 6
CHECKER_TILES = 8
IPH_COLOUR, IVH_COLOUR = "red", "dodgerblue"
BL_BRAIN_COLOUR, FU_BRAIN_COLOUR = "lime", "yellow"
TEMPLATE_COLOUR = "cyan"
PLANES = ("axial", "coronal", "sagittal")


def qc_slices(brain: np.ndarray, iph: np.ndarray, n: int = N_SLICES) -> list[int]:
    """``n`` axial slice indices over the brain's z-extent, one replaced by the largest-IPH slice."""
    zs = np.flatnonzero(brain.any(axis=(0, 1)))
    lo, hi = (int(zs[0]), int(zs[-1])) if len(zs) else (0, brain.shape[2] - 1)
    picks = np.unique(np.linspace(lo + 0.15 * (hi - lo), hi - 0.1 * (hi - lo), n).round().astype(int))
    if iph.any():
        peak = int(np.argmax(iph.sum(axis=(0, 1))))
        picks[np.argmin(np.abs(picks - peak))] = peak
    return sorted({int(z) for z in picks})


def _window(ct: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    lo, hi = hu_window
    return np.clip((ct - lo) / (hi - lo), 0.0, 1.0)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = CHECKER_TILES) -> np.ndarray:
    """Alternate square tiles of two same-shape 2D images."""
    ii, jj = np.indices(a.shape)
    size = max(1, min(a.shape) // tiles)
    return np.where(((ii // size) + (jj // size)) % 2 == 0, a, b)


def _contour(ax: plt.Axes, mask2d: np.ndarray, colour: str) -> None:
    if mask2d.any() and not mask2d.all():
        ax.contour(mask2d.T.astype(float), levels=[0.5], colors=colour, linewidths=0.9, origin="lower")


def _show(ax: plt.Axes, img2d: np.ndarray, aspect: float = 1.0) -> None:
    ax.imshow(img2d.T, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest", aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])


def plane_cuts(mask: np.ndarray) -> tuple[int, int, int]:
    """(x, y, z) voxel indices of the centroid of ``mask`` (the volume centre when it is empty)."""
    pts = np.argwhere(np.asarray(mask) > 0)
    centre = pts.mean(axis=0) if len(pts) else (np.asarray(mask.shape) - 1) / 2.0
    return tuple(int(round(c)) for c in centre)


def plane(vol: np.ndarray, name: str, cut: tuple[int, int, int]) -> np.ndarray:
    """2D cut of an (x, y, z) volume shown with the first axis horizontal: axial (x, y) at ``cut[2]``,
    coronal (x, z) at ``cut[1]``, sagittal (y, z) at ``cut[0]``."""
    x, y, z = cut
    return {"axial": vol[:, :, z], "coronal": vol[:, y, :], "sagittal": vol[x, :, :]}[name]


def _plane_aspect(name: str, spacing: tuple[float, float, float]) -> float:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[name]


def template_row(axes, bl: np.ndarray, bl_brain: np.ndarray, template_mask: np.ndarray,
                 spacing: tuple[float, float, float]) -> None:
    """Registered baseline (windowed) in three planes with the template (cyan) and baseline (green) brain outlines."""
    cut = plane_cuts(template_mask)
    for ax, name in zip(axes, PLANES, strict=False):
        _show(ax, plane(bl, name, cut), _plane_aspect(name, spacing))
        _contour(ax, plane(template_mask, name, cut), TEMPLATE_COLOUR)
        _contour(ax, plane(bl_brain, name, cut), BL_BRAIN_COLOUR)
        axis = {"axial": 2, "coronal": 1, "sagittal": 0}[name]
        ax.set_title(f"{name} {'xyz'[axis]}={cut[axis]}", fontsize=8)
    for ax in axes[len(PLANES):]:
        ax.axis("off")


def qc_figure(vols: dict[str, np.ndarray], hu_window: tuple[float, float], out_path: str | Path, title: str,
              template_mask: np.ndarray | None = None, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """Write the QC PNG from model-grid arrays keyed ``bl_ct, bl_iph, bl_ivh, fu_ct, fu_iph, fu_ivh,
    bl_brain, fu_brain`` (x, y, z order); ``template_mask`` (the template brain mask on the model grid,
    ``spacing`` the grid's) adds the template-placement row. Returns the path."""
    zs = qc_slices(vols["bl_brain"], vols["bl_iph"])
    bl, fu = _window(vols["bl_ct"], hu_window), _window(vols["fu_ct"], hu_window)
    rows = 3 if template_mask is None else 4
    ncols = max(len(zs), len(PLANES) if template_mask is not None else 1)
    fig, axes = plt.subplots(rows, ncols, figsize=(2.1 * ncols, 2.3 * rows), squeeze=False)
    for col in range(len(zs), ncols):
        for row in range(3):
            axes[row, col].axis("off")
    for col, z in enumerate(zs):
        ax = axes[0, col]
        _show(ax, bl[:, :, z])
        _contour(ax, vols["bl_iph"][:, :, z], IPH_COLOUR)
        _contour(ax, vols["bl_ivh"][:, :, z], IVH_COLOUR)
        ax.set_title(f"z={z}", fontsize=8)
        ax = axes[1, col]
        _show(ax, fu[:, :, z])
        _contour(ax, vols["fu_iph"][:, :, z], IPH_COLOUR)
        _contour(ax, vols["fu_ivh"][:, :, z], IVH_COLOUR)
        ax = axes[2, col]
        _show(ax, checkerboard(bl[:, :, z], fu[:, :, z]))
        _contour(ax, vols["bl_brain"][:, :, z], BL_BRAIN_COLOUR)
        _contour(ax, vols["fu_brain"][:, :, z], FU_BRAIN_COLOUR)
    for row, label in enumerate(("baseline\nIPH red, IVH blue", "follow-up (registered)\nIPH red, IVH blue",
                                 "checkerboard bl/fu\nbrain: bl green, fu yellow")):
        axes[row, 0].set_ylabel(label, fontsize=8)
    if template_mask is not None:
        template_row(axes[3], bl, vols["bl_brain"], np.asarray(template_mask) > 0, tuple(spacing))
        axes[3, 0].set_ylabel("baseline on template\nbrain: template cyan, bl green", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_path, dpi=110)
    return Path(out_path)
