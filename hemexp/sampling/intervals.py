"""Central intervals of a finite sample by order statistics (the sampler's summaries and calibration)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_EPS = 1e-9  # float slack so n * p landing exactly on an integer picks that order statistic


def order_stat_indices(n: int, level: float) -> tuple[int, int]:
    """1-based order-statistic indices (j, k) of the central ``level`` interval of ``n`` samples."""
    if n < 1:
        raise ValueError("need at least one sample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    lo_p, hi_p = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    j = max(1, math.ceil(n * lo_p - _EPS))
    k = min(n, max(j, math.ceil(n * hi_p - _EPS)))
    return j, k


def empirical_interval(samples: Sequence[float], level: float) -> tuple[float, float]:
    """Central ``level`` interval ``[X_(j), X_(k)]`` of the samples (see module docstring)."""
    x = np.sort(np.asarray(samples, dtype=float))
    j, k = order_stat_indices(x.size, level)
    return float(x[j - 1]), float(x[k - 1])
