"""The clinical vocabulary every stage shares: the seven conditioning variables (order = the conditioning
vector's), their model ranges and manifest plausibility limits, the paper's expansion rule, and the two
mask measures (volume in mL, Dice) that every stage must compute identically."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ClinicalVariable:
    """One clinical input: its manifest column, valid range (clamped before scaling) and kind."""

    name: str
    low: float
    high: float
    binary: bool = False
    description: str = ""

    def scale(self, value: float) -> float:
        """Clamp to the valid range, then map to [0, 1] (the paper's conditioning input)."""
        clamped = min(max(float(value), self.low), self.high)
        return (clamped - self.low) / (self.high - self.low)


# Order matters: it is the order of the conditioning vector fed to the clinical MLP.
CLINICAL_VARIABLES: tuple[ClinicalVariable, ...] = (
    ClinicalVariable("onset_to_ct_h", 0.0, 24.0, description="symptom onset to baseline CT (h)"),
    ClinicalVariable("baseline_iph_ml", 0.0, 250.0, description="baseline IPH volume (mL)"),
    ClinicalVariable("anticoagulant", 0.0, 1.0, binary=True, description="anticoagulant use"),
    ClinicalVariable("antiplatelet", 0.0, 1.0, binary=True, description="antiplatelet use"),
    ClinicalVariable("age", 0.0, 100.0, description="age (years)"),
    ClinicalVariable("gcs", 3.0, 15.0, description="Glasgow Coma Scale"),
    ClinicalVariable("sbp", 0.0, 250.0, description="systolic blood pressure (mmHg)"),
)


CLINICAL_NAMES: tuple[str, ...] = tuple(v.name for v in CLINICAL_VARIABLES)


CLINICAL_BY_NAME = {v.name: v for v in CLINICAL_VARIABLES}


# Plausibility limits for *manifest validation* (wider than the clamping ranges on purpose: a GCS of
# 2 or an onset of -1 h is a data error, an onset of 30 h is a late scan that the model clamps).
VALID_RANGES: dict[str, tuple[float, float]] = {
    "onset_to_ct_h": (0.0, 72.0),
    "baseline_iph_ml": (0.0, 400.0),
    "anticoagulant": (0.0, 1.0),
    "antiplatelet": (0.0, 1.0),
    "age": (0.0, 120.0),
    "gcs": (3.0, 15.0),
    "sbp": (40.0, 300.0),
}


EXPANSION_ABS_ML = 6.0


EXPANSION_REL = 0.33


def is_expansion(baseline_ml: float, followup_ml: float) -> bool:
    """The paper's hematoma-expansion rule: IPH growth >= 6 mL or >= 33 % relative growth.

    Relative growth is undefined for an empty baseline; then only the absolute rule applies.
    """
    growth = followup_ml - baseline_ml
    if growth >= EXPANSION_ABS_ML - 1e-9:
        return True
    return baseline_ml > 0 and growth / baseline_ml >= EXPANSION_REL - 1e-9


def clinical_vector(row: dict | pd.Series) -> np.ndarray:
    """Clinical variables of one patient, clamped and scaled to [0, 1] in :data:`CLINICAL_NAMES` order."""
    return np.array([v.scale(row[v.name]) for v in CLINICAL_VARIABLES], dtype=np.float32)


def mask_volume_ml(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Volume of a binary mask in mL (1 mL = 1000 mm^3): the one volume definition.

    Expansion labels, the sampler's ``volumes.tsv``, Table 1/2 and calibration all measure with it,
    so a sample and its reference (and the expansion rule above) always see the same number.
    """
    return float(np.count_nonzero(mask)) * float(np.prod(spacing_mm)) / 1000.0


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap 2|P ∩ R| / (|P| + |R|) of two masks (nonzero = inside); 1 when both are empty.

    Both-empty scores 1 because "nothing to find, nothing found" is a correct answer: Table 2's
    total-hemorrhage Dice of a patient without IVH, and the preprocess brain-Dice QC, must not turn
    a correct empty prediction into a failure (or a NaN that drops the patient from a mean). One
    empty, the other not, scores 0. Here (core) because preprocess (brain-mask QC) and evaluation
    (Table 2) both need it and preprocess may not import evaluation.
    """
    p, r = np.asarray(pred), np.asarray(ref)
    p, r = (p if p.dtype == bool else p > 0), (r if r.dtype == bool else r > 0)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    denom = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    if denom == 0:
        return 1.0
    return 2.0 * float(np.count_nonzero(p & r)) / denom
