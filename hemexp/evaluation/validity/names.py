"""Names the validity study's modules and the workflow share: the studied variants, the ``part`` of a
sample row and the tables the report writes.

Kept apart from :mod:`~hemexp.evaluation.validity.study` (which imports the sampler, the diffusion
stage and with them torch, MONAI and Lightning) so that the Snakefile, which needs only the product
names, and the scoring tables, which need only the row parts, import none of that: every Snakemake
invocation, and on a cluster every job, parses the Snakefile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hemexp.core.config import sampled_variants

CALIBRATION, EFFECT = "calibration", "effect"  # sample-row parts: predictive sets and clinical settings
TABLES = ("effects", "guidance", "adherence", "calibration", "patient_scores", "targets")
PRODUCTS = (*TABLES, "diagnostics", "truth_adherence")  # every CSV the report writes


def studied_variants(cfg: Mapping[str, Any]) -> list[str]:
    """``evaluation.validity.variants``, or every sampled variant when null."""
    chosen = cfg["evaluation"]["validity"]["variants"]
    return list(chosen) if chosen else list(sampled_variants(cfg))
