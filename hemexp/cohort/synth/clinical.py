"""Clinical variables of a synthetic patient, drawn to match the paper's cohort (Table 1).

Training cohort of the paper: age 72 [60, 80] y, GCS 14 [11, 15], SBP 182 [160, 204] mmHg, onset to
CT 2 [1, 3] h, anticoagulant 10 %, antiplatelet 13-23 %, baseline IPH 11 [5, 26] mL (median [IQR]).
Skewed variables use a split normal or a lognormal whose quartiles match those numbers. GCS falls
with hematoma size (as in real cohorts), which also makes the law's GCS and volume effects partly
confounded, like in real data. The baseline IPH volume drawn here is only the *target*: the value
in the manifest is measured on the written mask.
"""

from __future__ import annotations

import numpy as np

Z75 = 0.6745  # standard normal 75th percentile: IQR half-width / Z75 = sd
ANTICOAGULANT_RATE = 0.10
ANTIPLATELET_RATE = 0.15


def _split_normal(rng: np.random.Generator, median: float, q1: float, q3: float) -> float:
    """Median and quartiles matched by a normal with different sd below and above the median."""
    z = rng.normal()
    return median + z * ((median - q1) if z < 0 else (q3 - median)) / Z75


def _lognormal(rng: np.random.Generator, median: float, q1: float, q3: float) -> float:
    sd = np.log(q3 / q1) / (2 * Z75)
    return float(median * np.exp(sd * rng.normal()))


def draw_baseline_target_ml(rng: np.random.Generator, low: float = 2.0, high: float = 80.0) -> float:
    """Target baseline IPH volume (mL): lognormal with median 11, quartiles 5 and 26, clipped."""
    return float(np.clip(_lognormal(rng, 11.0, 5.0, 26.0), low, high))


def _gcs(rng: np.random.Generator, volume_ml: float) -> int:
    """GCS 14 [11, 15]: a latent normal, lowered by large hematomas, cut into the 3-15 scale."""
    latent = rng.normal() - 0.45 * np.log(volume_ml / 11.0)
    # descending cut points: P(15) ~ 0.40, P(>= 14) ~ 0.50, P(<= 11) ~ 0.27 at the median volume
    cuts = np.array([0.25, 0.0, -0.3, -0.6, -0.8, -1.0, -1.2, -1.4, -1.6, -1.8, -2.0, -2.3])
    return int(15 - np.count_nonzero(latent < cuts))


def draw_clinical(rng: np.random.Generator, baseline_target_ml: float) -> dict[str, float]:
    """The six non-imaging clinical variables (baseline_iph_ml is added after the mask is measured)."""
    age = float(np.clip(round(_split_normal(rng, 72.0, 60.0, 80.0)), 25, 98))
    sbp = float(np.clip(round(rng.normal(182.0, (204.0 - 160.0) / (2 * Z75))), 100, 260))
    onset = float(np.clip(round(_lognormal(rng, 2.0, 1.0, 3.2), 1), 0.3, 24.0))
    return {
        "onset_to_ct_h": onset,
        "anticoagulant": float(rng.random() < ANTICOAGULANT_RATE),
        "antiplatelet": float(rng.random() < ANTIPLATELET_RATE),
        "age": age,
        "gcs": float(_gcs(rng, baseline_target_ml)),
        "sbp": sbp,
    }
