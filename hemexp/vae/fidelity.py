"""VAE fidelity (paper §3 "Autoencoder fidelity"): CT SSIM, IPH Dice and IVH Dice, train and test.

Every target slice of a split is encoded to its posterior mean and decoded; CT is clamped to [0, 1]
and the mask heads are thresholded at 0.5. Metrics are MONAI's:

* **CT SSIM** — ``SSIMMetric(spatial_dims=2, data_range=1.0)`` on the windowed CT, per slice;
* **IPH / IVH Dice** — ``DiceMetric(ignore_empty=False)``, per slice.

Empty-mask convention (:data:`EMPTY_MASK_CONVENTION`, same as the Table 2 metrics in
:mod:`hemexp.evaluation.metrics`): a slice whose reference *and* reconstruction are both empty scores Dice 1
(the VAE correctly reproduced "no bleed"); reference empty but reconstruction not scores 0 (a
hallucinated bleed is an error). Most slices have no IVH, so this matters for IVH Dice; the number of
slices with an empty reference is reported next to each mean.

Each column is the mean over all baseline and follow-up target slices of the split (the paper's
layout: rows Train/Test, columns CT SSIM, IPH Dice, IVH Dice).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.metrics import DiceMetric, SSIMMetric
from torch.utils.data import DataLoader, Dataset

from hemexp.core.files import atomic_path, write_json
from hemexp.core.layout import Layout
from hemexp.core.tables import markdown_table, write_csv
from hemexp.tracking.runs import RUN_ID_FILE, log_to_model_run
from hemexp.vae.figures import figure_slices, reconstruction_figure
from hemexp.vae.model import MultiHeadVAE, load_vae, reconstruct
from hemexp.vae.train import target_slices

log = logging.getLogger(__name__)

COLUMNS = ("CT SSIM", "IPH Dice", "IVH Dice")
EMPTY_MASK_CONVENTION = (
    "Dice per slice; a slice with empty reference and empty reconstruction scores 1, empty reference "
    "with a non-empty reconstruction scores 0 (MONAI DiceMetric(ignore_empty=False))."
)
PAPER_FIDELITY = {"Train": (0.931, 0.986, 0.943), "Test": (0.914, 0.986, 0.974)}


def slice_metrics(x: torch.Tensor, recon: torch.Tensor, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per-slice CT SSIM, IPH Dice and IVH Dice of reconstructions ``recon`` of slices ``x``."""
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    out = {"ct_ssim": ssim(recon[:, 0:1].clamp(0, 1), x[:, 0:1].float()).reshape(-1)}
    for c, name in ((1, "iph"), (2, "ivh")):
        pred = (recon[:, c : c + 1] > threshold).float()
        ref = (x[:, c : c + 1] > 0.5).float()
        out[f"{name}_dice"] = dice(pred, ref).reshape(-1)
        out[f"{name}_empty"] = (ref.flatten(1).sum(1) == 0).float()
    return {k: v.cpu().numpy().astype(float) for k, v in out.items()}


def evaluate_dataset(vae: MultiHeadVAE, dataset: Dataset, batch_size: int = 32,
                     device: str | torch.device = "cpu") -> dict[str, Any]:
    """Mean fidelity over every slice of ``dataset`` (items [3, H, W]) plus slice counts."""
    vae = vae.to(device).eval()
    parts: dict[str, list[np.ndarray]] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        batch = batch.to(device)
        for k, v in slice_metrics(batch, reconstruct(vae, batch)).items():
            parts.setdefault(k, []).append(v)
    per = {k: np.concatenate(v) for k, v in parts.items()}
    return {
        "CT SSIM": float(per["ct_ssim"].mean()),
        "IPH Dice": float(per["iph_dice"].mean()),
        "IVH Dice": float(per["ivh_dice"].mean()),
        "n_slices": int(len(per["ct_ssim"])),
        "n_iph_empty": int(per["iph_empty"].sum()),
        "n_ivh_empty": int(per["ivh_empty"].sum()),
    }


def fidelity_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Rows Train/Test, columns CT SSIM, IPH Dice, IVH Dice (the paper's layout)."""
    table = pd.DataFrame({split: {c: r[c] for c in COLUMNS} for split, r in results.items()}).T
    table.index.name = "split"
    return table[list(COLUMNS)]


def to_markdown(table: pd.DataFrame, results: dict[str, dict[str, Any]]) -> str:
    """The fidelity table (3 decimals, slice count per split), the empty-mask convention and the paper's numbers."""
    shown = pd.DataFrame({"split": list(table.index),
                          **{c: [f"{float(v):.3f}" for v in table[c]] for c in COLUMNS},
                          "slices": [results[split]["n_slices"] for split in table.index]})
    paper = " / ".join(f"{c} {PAPER_FIDELITY['Train'][i]:.3f}/{PAPER_FIDELITY['Test'][i]:.3f}"
                       for i, c in enumerate(COLUMNS))
    return markdown_table(shown) + f"\n{EMPTY_MASK_CONVENTION}\n\nPaper (train/test): {paper}.\n"


def evaluate_vae(cfg: dict[str, Any], vae_path: str | Path | None = None) -> dict[str, Any]:
    """``hemexp eval-vae``: fidelity table (csv/md/json), reconstruction figure, MLflow logging."""

    layout = Layout.of(cfg)
    run_dir = layout.vae_dir
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_vae(vae_path or layout.vae_model, map_location=device)
    datasets = {"Train": target_slices(cfg, "train", cache=False), "Test": target_slices(cfg, "test", cache=False)}
    results = {split: evaluate_dataset(vae, ds, 32, device) for split, ds in datasets.items()}
    table = fidelity_table(results)
    paths = {ext: layout.metric(f"vae_fidelity.{ext}") for ext in ("csv", "md", "json")}
    paths["png"] = layout.figure("vae_reconstructions.png")
    write_csv(table, paths["csv"], index=True, float_format="%.4f")
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(to_markdown(table, results))
    write_json(paths["json"], {"results": results, "empty_mask_convention": EMPTY_MASK_CONVENTION,
                               "paper": PAPER_FIDELITY})
    x = figure_slices(datasets["Test"])
    reconstruction_figure(x, reconstruct(vae, x.to(device)).cpu(), paths["png"],
                          title="VAE reconstructions (test slices with the most IPH)")
    log.info("VAE fidelity:\n%s", to_markdown(table, results))
    if (run_dir / RUN_ID_FILE).exists():
        flat = {f"fidelity_{split.lower()}_{c.lower().replace(' ', '_')}": r[c]
                for split, r in results.items() for c in COLUMNS}
        log_to_model_run(cfg, run_dir, flat, [paths["csv"], paths["md"], paths["png"]], artifact_path="fidelity")
    else:
        log.warning("no MLflow run id in %s: fidelity not logged to a training run", run_dir)
    return results
