"""Evaluation figures: guidance sweep + perturbation bars (paper Fig. 3), PIT histogram, calibration bars.

All functions take the tables produced by :mod:`hemexp.evaluation.guidance.effects` and :mod:`hemexp.evaluation.calibration`,
draw with matplotlib's non-interactive Agg backend (cluster nodes have no display) and write the file
atomically.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hemexp.core.files import save_figure  # noqa: E402

_FAV, _STB = "#c0392b", "#2471a3"


def _save(fig: plt.Figure, path: str | Path) -> None:
    save_figure(fig, path, dpi=150, bbox_inches="tight")


def _sd(series: pd.Series) -> np.ndarray:
    return series.fillna(0.0).to_numpy(float)  # a single patient has no sd: draw no error bar


def plot_guidance_and_perturbations(separation: pd.DataFrame, effects: pd.DataFrame, path: str | Path,
                                    title: str = "") -> None:
    """Fig. 3: (a) ΔV of the two profiles vs guidance scale, separation on a twin axis; (b) ΔV bars.

    ``separation`` is :func:`hemexp.evaluation.guidance.effects.guidance_separation` output; ``effects`` is
    :func:`hemexp.evaluation.guidance.effects.perturbation_effects` output for one guidance scale. Error bars: ±1 sd
    over patients.
    """
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    w = separation["guidance_scale"].to_numpy(float)
    ax_a.errorbar(w, separation["dv_favouring_mean"], yerr=_sd(separation["dv_favouring_sd"]), color=_FAV,
                  marker="o", capsize=3, label="expansion-favouring")
    ax_a.errorbar(w, separation["dv_stable_mean"], yerr=_sd(separation["dv_stable_sd"]), color=_STB,
                  marker="s", capsize=3, label="stable")
    ax_a.set_xlabel("guidance scale w")
    ax_a.set_ylabel("ΔV total hemorrhage (mL)")
    twin = ax_a.twinx()
    twin.plot(w, separation["separation_mean"], color="0.3", linestyle="--", marker="^", label="separation")
    twin.set_ylabel("separation ΔV(fav) − ΔV(stable) (mL)")
    lines = ax_a.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # below the axes: inside, it covers the ±sd error bars of the first guidance scales
    ax_a.legend(lines, [str(h.get_label()) for h in lines], fontsize=8, loc="upper center",
                bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    ax_a.set_title("(a) guidance sweep")

    eff = effects.reset_index(drop=True)
    x = np.arange(len(eff))
    colors = [_FAV if v > 0 else _STB for v in eff["delta_ml_mean"].fillna(0.0)]
    ax_b.bar(x, eff["delta_ml_mean"], yerr=_sd(eff["delta_ml_sd"]), color=colors, capsize=3)
    ax_b.axhline(0.0, color="k", linewidth=0.8)
    ax_b.set_xticks(x, eff["scenario"].str.replace("_", " "), rotation=30, ha="right", fontsize=8)
    ax_b.set_ylabel("ΔV vs unperturbed (mL)")
    ax_b.set_title("(b) single-variable perturbations")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_pit_histogram(counts: np.ndarray, path: str | Path, title: str = "") -> None:
    """Rank histogram of the truth among N samples (N+1 bars) with the uniform expectation line."""
    counts = np.asarray(counts, dtype=float)
    n_bins = counts.size
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(np.arange(n_bins), counts, color="0.55", edgecolor="k")
    ax.axhline(counts.sum() / n_bins, color=_FAV, linestyle="--", label="calibrated expectation")
    ax.set_xticks(np.arange(n_bins))
    ax.set_xlabel(f"rank of true follow-up volume among {n_bins - 1} samples")
    ax.set_ylabel("patients")
    ax.legend(fontsize=8)
    ax.set_title(title or "PIT / rank histogram")
    _save(fig, path)


def plot_calibration_bars(summary: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Observed interval coverage (with 95 % Wilson interval) next to the calibrated expectation."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = np.arange(len(summary))
    obs = summary["observed"].to_numpy(float)
    err = np.vstack([obs - summary["observed_ci_low"].to_numpy(float), summary["observed_ci_high"].to_numpy(float) - obs])
    ax.bar(x - 0.18, obs, width=0.36, yerr=err, capsize=3, color="0.55", edgecolor="k", label="observed")
    ax.bar(x + 0.18, summary["expected_calibrated"], width=0.36, color=_STB, label="expected if calibrated")
    ax.scatter(x, summary["level"], marker="_", s=400, color=_FAV, zorder=3, label="nominal level")
    ax.set_xticks(x, [f"{lv:.0%} interval" for lv in summary["level"]])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of patients with truth inside")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    ax.set_title(title or "interval coverage")
    _save(fig, path)


def plot_learned_vs_true(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Learned vs true clinical effects side by side, one panel per comparison block.

    ``table`` is :func:`hemexp.evaluation.guidance.run.learned_vs_true_table` output: per scenario the learned
    and the growth-law mean (sd over patients) of ΔV. Bars share one axis per panel, so an effect the
    model has not learned shows as a bar near zero beside the true one rather than being rescaled away.
    """
    blocks = list(dict.fromkeys(table["comparison"]))
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.5 * len(blocks), 4), squeeze=False)
    for ax, block in zip(axes[0], blocks, strict=True):
        rows = table[table["comparison"] == block].reset_index(drop=True)
        x = np.arange(len(rows))
        for offset, kind, color in ((-0.2, "true", "0.55"), (0.2, "learned", _FAV)):
            ax.bar(x + offset, rows[f"{kind}_delta_ml_mean"], width=0.4, color=color, capsize=3,
                   yerr=_sd(rows[f"{kind}_delta_ml_sd"]), label=f"{kind} (growth law)" if kind == "true" else kind)
        ax.axhline(0.0, color="k", linewidth=0.8)
        ax.set_xticks(x, rows["scenario"].str.replace("_", " "), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ΔV (mL), mean ± sd over patients")
        ax.set_title(block, fontsize=10)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
