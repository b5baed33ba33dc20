"""Interval coverage, expected calibrated coverage and PIT on constructed cases."""

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from hemexp.evaluation.calibration import (
    calibration_note,
    calibration_summary,
    expected_coverage,
    patient_calibration,
    pit_rank,
    rank_histogram,
)
from hemexp.sampling.intervals import empirical_interval, order_stat_indices


def test_order_statistics_for_five_samples():
    assert order_stat_indices(5, 0.8) == (1, 5)  # the [min, max] hull
    assert order_stat_indices(5, 0.5) == (2, 4)
    assert expected_coverage(5, 0.8) == pytest.approx(4 / 6)  # (N-1)/(N+1) = 67 %
    assert expected_coverage(5, 0.5) == pytest.approx(2 / 6)
    assert empirical_interval([5, 1, 4, 2, 3], 0.8) == (1.0, 5.0)
    assert empirical_interval([5, 1, 4, 2, 3], 0.5) == (2.0, 4.0)


@pytest.mark.parametrize("n", [4, 7, 10, 20, 99])
@pytest.mark.parametrize("level", [0.5, 0.8, 0.9])
def test_intervals_match_numpy_inverted_cdf_and_float_edges(n, level):
    x = np.random.default_rng(n).normal(size=n)
    lo, hi = empirical_interval(x, level)
    j, k = order_stat_indices(n, level)
    # inverted CDF = ceil(n p), here in exact rational arithmetic (no float rounding at n p integer)
    lev = Fraction(str(level))
    assert j == max(1, math.ceil(n * (1 - lev) / 2))
    assert k == min(n, math.ceil(n * (1 + lev) / 2))
    assert (lo, hi) == (np.sort(x)[j - 1], np.sort(x)[k - 1])


def test_expected_coverage_matches_simulation_of_a_calibrated_model():
    rng = np.random.default_rng(0)
    n, trials = 5, 40_000
    draws = rng.normal(size=(trials, n + 1))  # truth exchangeable with the samples
    for level in (0.5, 0.8):
        j, k = order_stat_indices(n, level)
        s = np.sort(draws[:, :n], axis=1)
        inside = (s[:, j - 1] <= draws[:, n]) & (draws[:, n] <= s[:, k - 1])
        assert inside.mean() == pytest.approx(expected_coverage(n, level), abs=0.01)


def test_pit_rank_and_random_ties():
    rng = np.random.default_rng(0)
    assert pit_rank([1, 2, 3, 4, 5], 0.5, rng) == 0
    assert pit_rank([1, 2, 3, 4, 5], 9.0, rng) == 5
    assert pit_rank([1, 2, 3, 4, 5], 3.5, rng) == 3
    ranks = {pit_rank([1, 2, 2, 2, 5], 2.0, rng) for _ in range(200)}
    assert ranks == {1, 2, 3, 4}  # one below, three tied: any of 1..4


def _table(truth_inside: bool, n_patients=6, n=5):
    rows = []
    for p in range(n_patients):
        vols = 10.0 + p + np.arange(n)
        truth = float(vols[2]) + 0.1 if truth_inside else 100.0
        rows += [{"patient_id": f"P{p}", "volume_ml": v, "truth_ml": truth} for v in vols]
    return pd.DataFrame(rows)


def test_truth_always_inside_gives_full_coverage():
    per = patient_calibration(_table(True), [0.5, 0.8])
    summary = calibration_summary(per, [0.5, 0.8]).set_index("level")
    assert summary.loc[0.5, "observed"] == 1.0 and summary.loc[0.8, "observed"] == 1.0
    assert summary.loc[0.8, "expected_calibrated"] == pytest.approx(4 / 6)
    assert summary.loc[0.8, "observed_ci_low"] < 1.0 <= summary.loc[0.8, "observed_ci_high"] + 1e-12
    assert (per["rank"] == 3).all() and ((per["pit"] >= 3 / 6) & (per["pit"] < 4 / 6)).all()


def test_truth_always_above_gives_zero_coverage_and_top_rank():
    per = patient_calibration(_table(False), [0.8])
    assert calibration_summary(per, [0.8]).loc[0, "observed"] == 0.0
    assert rank_histogram(per, 5).tolist() == [0, 0, 0, 0, 0, 6]


def test_non_constant_truth_is_rejected():
    t = _table(True)
    t.loc[0, "truth_ml"] = -1.0
    with pytest.raises(ValueError, match="truth_ml"):
        patient_calibration(t, [0.8])


def test_note_states_expected_coverage_at_configured_n():
    per = patient_calibration(_table(True), [0.5, 0.8])
    note = calibration_note(calibration_summary(per, [0.5, 0.8]), n_samples=5)
    assert "expected if calibrated 66.7%" in note and "expected if calibrated 33.3%" in note
    assert "N+1 = 6 values" in note and "[X_(1), X_(5)]" in note
