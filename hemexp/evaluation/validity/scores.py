"""Scores of the validity study: CRPS of sample sets and of the oracle, and patient-bootstrap intervals.

* **Fair CRPS** of an N-sample forecast (``scoringrules``' ``fair`` estimator,
  ``E|X - y| - Σ|X_i - X_j| / (2N(N-1))``): unbiased for the CRPS of the distribution the samples
  come from, so a 20-sample model is not penalised against an oracle scored on thousands of points.
* **Oracle CRPS**: the law's own predictive distribution (:func:`hemexp.cohort.synth.law.
  predictive_relative_growth`, mid-quantile points, the CRPS of that discrete distribution), the best
  any model can do; **copy-baseline**: the point forecast "no change", whose CRPS is ``|baseline - y|``.
* **Intervals**: percentile bootstrap over *test patients* (``scipy.stats.bootstrap``), the unit that
  varies between studies; samples within a patient are summarised first (per-patient means, shares,
  scores), so many samples of few patients cannot make an interval look narrow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scoringrules as sr
from scipy.stats import bootstrap


def fair_crps(samples: Sequence[float], truth: float) -> float:
    """Fair (unbiased) CRPS of one sample set against the observed value (mL)."""
    x = np.asarray(samples, dtype=float)
    if x.size < 2:
        raise ValueError("the fair CRPS needs at least 2 samples")
    return float(sr.crps_ensemble(float(truth), x, estimator="fair", backend="numpy"))


def distribution_crps(points: Sequence[float], truth: float) -> float:
    """CRPS of the discrete distribution of equally weighted ``points`` (the oracle's quantile grid)."""
    return float(sr.crps_ensemble(float(truth), np.asarray(points, dtype=float), estimator="nrg", backend="numpy"))


def point_crps(forecast: float, truth: float) -> float:
    """CRPS of a point forecast: the absolute error."""
    return abs(float(forecast) - float(truth))


def patient_bootstrap(columns: Sequence[Sequence[float]], statistic: Callable[..., float], n_resamples: int,
                      ci: float, seed: int) -> tuple[float, float, float]:
    """(estimate, low, high) of ``statistic(*columns)`` with a percentile bootstrap over patients.

    ``columns`` are per-patient arrays of equal length (paired: one patient is resampled in all of
    them together, e.g. learned and true effects for a ratio). NaN patients are dropped first; fewer
    than 2 patients, or a statistic constant under resampling, give a degenerate interval.
    """
    data = [np.asarray(c, dtype=float) for c in columns]
    keep = np.all([np.isfinite(c) for c in data], axis=0) if data else np.array([], bool)
    data = [c[keep] for c in data]
    if not data or len(data[0]) == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(statistic(*data))
    if len(data[0]) < 2 or all(np.ptp(c) == 0 for c in data):
        return estimate, estimate, estimate
    res = bootstrap(tuple(data), lambda *c: statistic(*c), paired=True, vectorized=False,
                    n_resamples=int(n_resamples), confidence_level=float(ci), method="percentile",
                    rng=np.random.default_rng(seed))
    return estimate, float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def ratio_of_means(a: np.ndarray, b: np.ndarray) -> float:
    """mean(a) / mean(b): a learned/true effect ratio, a model/oracle CRPS ratio."""
    denominator = float(np.mean(b))
    return float(np.mean(a)) / denominator if denominator != 0 else float("nan")
