"""Per-patient sampling figure: what a clinician reads off N simulated follow-ups at a glance.

Top row: the baseline (CT with IPH red / IVH blue contours), the true follow-up when known, the mixed
IPH probability map and the new-hemorrhage probability map over the baseline CT, and a histogram of
the sampled follow-up volumes (total and IPH) with the baseline volume and the true follow-up marked.
Bottom row: a montage of the samples on the same slice (the slice with the largest baseline IPH),
each titled with its flag and volumes. Neurological convention (patient's right on the image's right,
anterior up), as the preprocessing QC figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hemexp.core.files import save_figure  # noqa: E402

IPH_COLOUR, IVH_COLOUR = "red", "dodgerblue"
DISPLAY_HU = (0.0, 100.0)  # brain window for display
MAX_MONTAGE = 8


def figure_slice(bl_iph: np.ndarray, zs: np.ndarray) -> int:
    """The sampled slice with the largest baseline IPH area."""
    areas = bl_iph[:, :, zs].sum(axis=(0, 1))
    return int(zs[int(np.argmax(areas))])


def _gray(ax: plt.Axes, ct_hu: np.ndarray) -> None:
    lo, hi = DISPLAY_HU
    ax.imshow(np.clip((ct_hu.T - lo) / (hi - lo), 0, 1), cmap="gray", vmin=0, vmax=1, origin="lower",
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _contours(ax: plt.Axes, iph: np.ndarray, ivh: np.ndarray) -> None:
    for mask, colour in ((iph, IPH_COLOUR), (ivh, IVH_COLOUR)):
        if mask.any() and not mask.all():
            ax.contour(mask.T.astype(float), levels=[0.5], colors=colour, linewidths=0.8, origin="lower")


def _overlay(ax: plt.Axes, ct_hu: np.ndarray, prob: np.ndarray, bl_mask: np.ndarray, title: str) -> Any:
    _gray(ax, ct_hu)
    shown = np.ma.masked_less_equal(prob.T, 0.0)
    im = ax.imshow(shown, cmap="hot", vmin=0, vmax=1, origin="lower", alpha=0.75, interpolation="nearest")
    if bl_mask.any():
        ax.contour(bl_mask.T.astype(float), levels=[0.5], colors="cyan", linewidths=0.6, origin="lower")
    ax.set_title(title, fontsize=8)
    return im


def _histogram(ax: plt.Axes, table: pd.DataFrame, summary: dict[str, Any]) -> None:
    total, iph = table["total_ml"].to_numpy(), table["iph_ml"].to_numpy()
    base, truth = summary["baseline_ml"], summary.get("true_followup_ml")
    marks = [base["total"], base["iph"], *(truth[k] for k in ("total", "iph") if truth)]
    lo, hi = min(total.min(), iph.min(), *marks), max(total.max(), iph.max(), *marks)
    pad = max(0.5, 0.08 * (hi - lo))
    bins = np.linspace(max(0.0, lo - pad), hi + pad, 16)
    ax.hist(total, bins=bins, color="0.6", label="sampled total")
    ax.hist(iph, bins=bins, histtype="step", color=IPH_COLOUR, linewidth=1.5, label="sampled IPH")
    ax.axvline(base["total"], color="k", linestyle="--", linewidth=1.2, label=f"baseline total {base['total']:.1f}")
    ax.axvline(base["iph"], color=IPH_COLOUR, linestyle="--", linewidth=1.0, label=f"baseline IPH {base['iph']:.1f}")
    if truth:
        ax.axvline(truth["total"], color="green", linewidth=1.5, label=f"true follow-up total {truth['total']:.1f}")
        ax.axvline(truth["iph"], color="green", linestyle=":", linewidth=1.5, label=f"true follow-up IPH {truth['iph']:.1f}")
    ax.set_xlabel("follow-up volume (mL)", fontsize=8)
    ax.set_ylabel("samples", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best", frameon=False)


def _title(summary: dict[str, Any]) -> str:
    f = summary["flag"]
    fu = summary["followup_ml"]
    iv, tv = fu["iph"]["interval_80"], fu["total"]["interval_80"]
    truth = summary.get("true_expansion")
    known = "" if truth is None else f", true expansion={int(truth)}"
    return (f"{summary['patient_id']} — {summary['variant']}, {summary['n_samples']} samples, guidance "
            f"{summary['guidance_scale']:g}, flag {f['source']} (p={f['p']:.2f}{known})\n"
            f"follow-up IPH median {fu['iph']['median']:.1f} mL [80%: {iv[0]:.1f}–{iv[1]:.1f}], total "
            f"{fu['total']['median']:.1f} mL [{tv[0]:.1f}–{tv[1]:.1f}];  P(expansion)={summary['p_expansion']:.2f}, "
            f"P(IVH)={summary['p_ivh']:.2f}")


def sample_figure(out: str | Path, baseline: dict[str, np.ndarray], vols: dict[str, np.ndarray],
                  maps: dict[str, np.ndarray], table: pd.DataFrame, summary: dict[str, Any], zs: np.ndarray,
                  followup: dict[str, np.ndarray] | None = None) -> Path:
    """Write the figure (PNG) for one patient; arrays are model-grid (x, y, z), ``vols`` ``[N, X, Y, Z]``."""
    z = figure_slice(baseline["iph"], zs)
    n_show = min(len(table), MAX_MONTAGE)
    ncols = max(6, n_show)
    fig = plt.figure(figsize=(1.9 * ncols, 5.2))
    grid = fig.add_gridspec(2, ncols, height_ratios=[1, 1], hspace=0.55, wspace=0.08, top=0.82, bottom=0.03,
                            left=0.02, right=0.98)
    ax = fig.add_subplot(grid[0, 0])
    _gray(ax, baseline["ct"][:, :, z])
    _contours(ax, baseline["iph"][:, :, z], baseline["ivh"][:, :, z])
    ax.set_title(f"baseline (z={z})", fontsize=8)
    ax = fig.add_subplot(grid[0, 1])
    if followup is not None and "ct" in followup:
        _gray(ax, followup["ct"][:, :, z])
        _contours(ax, followup["iph"][:, :, z], followup["ivh"][:, :, z])
        ax.set_title("true follow-up", fontsize=8)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "true follow-up\nunknown", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    bl_any = (baseline["iph"][:, :, z] > 0) | (baseline["ivh"][:, :, z] > 0)
    _overlay(fig.add_subplot(grid[0, 2]), baseline["ct"][:, :, z], maps["iph_prob"][:, :, z], baseline["iph"][:, :, z],
             "P(IPH), mixed")
    im = _overlay(fig.add_subplot(grid[0, 3]), baseline["ct"][:, :, z], maps["new_prob"][:, :, z], bl_any,
                  "P(new hemorrhage)")
    cax = fig.axes[-1].inset_axes([0.05, -0.1, 0.9, 0.05])  # horizontal bar under the map panel
    fig.colorbar(im, cax=cax, orientation="horizontal").ax.tick_params(labelsize=6)
    hist = fig.add_subplot(grid[0, 4:])
    pos = hist.get_position()
    hist.set_position([pos.x0 + 0.065, pos.y0, pos.width - 0.065, pos.height])
    _histogram(hist, table, summary)
    for k in range(n_show):
        ax = fig.add_subplot(grid[1, k])
        _gray(ax, vols["ct"][k][:, :, z])
        _contours(ax, vols["iph"][k][:, :, z], vols["ivh"][k][:, :, z])
        r = table.iloc[k]
        ax.set_title(f"#{k} flag {int(r['flag'])}: IPH {r['iph_ml']:.1f}\nIVH {r['ivh_ml']:.1f} mL"
                     f"{' (exp.)' if r['expansion'] else ''}", fontsize=7)
    fig.suptitle(_title(summary), fontsize=8.5)
    save_figure(fig, out, dpi=90)
    return Path(out)
