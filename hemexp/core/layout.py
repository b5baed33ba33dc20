"""Where every product lives under ``results_dir``: the one owner of result paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def raw_dir(cfg: dict[str, Any]) -> Path:
    """Where ``hemexp synth`` writes the synthetic cohort (raw DICOM/NIfTI + manifest)."""
    return Path(cfg["results_dir"]) / "raw"


def synthetic_manifest_path(cfg: dict[str, Any]) -> Path:
    return raw_dir(cfg) / "manifest.tsv"


def manifest_path(cfg: dict[str, Any]) -> Path:
    """The manifest every stage reads: the user's, or the one ``hemexp synth`` writes."""
    if cfg["cohort"]["source"] == "synthetic":
        return synthetic_manifest_path(cfg)
    return Path(cfg["cohort"]["manifest"])
