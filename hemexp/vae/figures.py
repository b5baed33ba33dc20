"""VAE figures: input/reconstruction montages for fidelity reports and training previews."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hemexp.core.files import save_figure


def reconstruction_figure(x: torch.Tensor, recon: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Grid: one row per slice; columns CT in/out, IPH in/out, IVH in/out (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, recon = x.detach().float().cpu().numpy(), recon.detach().float().cpu().numpy()
    names = ("CT", "IPH", "IVH")
    n = x.shape[0]
    fig, axes = plt.subplots(n, 6, figsize=(12, 2.1 * n + 0.4), squeeze=False)
    for i in range(n):
        for c, name in enumerate(names):
            for j, (img, kind) in enumerate(((x, "input"), (recon, "output"))):
                ax = axes[i, 2 * c + j]
                ax.imshow(img[i, c].T, cmap="gray" if c == 0 else "magma", vmin=0, vmax=1, origin="lower")
                ax.set_axis_off()
                if i == 0:
                    ax.set_title(f"{name} {kind}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return Path(path)


def figure_slices(dataset: Dataset, n: int = 4) -> torch.Tensor:
    """The ``n`` slices with the most IPH among an evenly spaced subset (at most 256 looked at)."""
    look = np.unique(np.linspace(0, len(dataset) - 1, num=min(256, len(dataset))).round().astype(int))
    area = [float(dataset[int(i)][1].sum()) for i in look]
    best = sorted(look[np.argsort(area)[::-1][:n]])
    return torch.stack([dataset[int(i)] for i in best])


