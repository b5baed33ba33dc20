"""The ground-truth growth law of the synthetic cohort (pure functions, no I/O, no randomness).

Hematoma growth between baseline and follow-up is modelled on the relative scale, because clinical
predictors act multiplicatively on growth and the paper's expansion rule is partly relative:

    eta = intercept + sum_k beta_k * x_k + noise,     noise ~ N(0, noise_sd^2)
    r   = min(exp(eta), max_relative_growth)          (relative IPH growth, >= 0)
    V_followup = V_baseline * (1 + r)

with the features x_k of :func:`law_features` (each centred at a typical value, so the intercept is
the log relative growth of a "reference" patient). The expectations in :func:`expected_growth` are
exact for this lognormal model (closed form of the capped lognormal mean), so evaluation code can
compare a model's predicted growth with the true conditional expectation, not only with one draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

from hemexp.core.clinical import EXPANSION_ABS_ML, EXPANSION_REL

# law key -> (clinical variable, feature description); the feature transform is in law_features.
COEFFICIENTS: dict[str, str] = {
    "log_onset_h": "log(1 + onset_to_ct_h)",
    "log_baseline_ml": "log(baseline_iph_ml / 10)",
    "anticoagulant": "anticoagulant (0/1)",
    "antiplatelet": "antiplatelet (0/1)",
    "age_per_10y": "(age - 70) / 10",
    "gcs_per_point": "gcs - 15",
    "sbp_per_10mmhg": "(sbp - 160) / 10",
}
# Clinical variable driving each coefficient (used by tests and the truth file).
COEFFICIENT_VARIABLE: dict[str, str] = {
    "log_onset_h": "onset_to_ct_h",
    "log_baseline_ml": "baseline_iph_ml",
    "anticoagulant": "anticoagulant",
    "antiplatelet": "antiplatelet",
    "age_per_10y": "age",
    "gcs_per_point": "gcs",
    "sbp_per_10mmhg": "sbp",
}


def law_features(clinical: Mapping[str, float]) -> dict[str, float]:
    """Centred features of the law, keyed like the coefficients in the config's ``law`` section."""
    return {
        "log_onset_h": math.log1p(max(float(clinical["onset_to_ct_h"]), 0.0)),
        "log_baseline_ml": math.log(max(float(clinical["baseline_iph_ml"]), 0.1) / 10.0),
        "anticoagulant": float(clinical["anticoagulant"]),
        "antiplatelet": float(clinical["antiplatelet"]),
        "age_per_10y": (float(clinical["age"]) - 70.0) / 10.0,
        "gcs_per_point": float(clinical["gcs"]) - 15.0,
        "sbp_per_10mmhg": (float(clinical["sbp"]) - 160.0) / 10.0,
    }


def linear_predictor(clinical: Mapping[str, float], law: Mapping[str, float]) -> float:
    """Mean of eta (the log relative growth) given the clinical variables: the noise-free law."""
    feats = law_features(clinical)
    return float(law["intercept"]) + sum(float(law[k]) * v for k, v in feats.items())


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def expansion_eta_threshold(baseline_ml: float) -> float:
    """Smallest eta that makes the paper's rule call expansion (growth >= 6 mL or >= 33 %)."""
    needed = EXPANSION_REL if baseline_ml <= 0 else min(EXPANSION_REL, EXPANSION_ABS_ML / baseline_ml)
    return math.log(needed)


def expected_growth(clinical: Mapping[str, float], law: Mapping[str, float]) -> dict[str, float]:
    """The true conditional distribution of growth for these clinical values (before patient noise).

    Returns ``expected_log_relative_growth`` (E[eta] = the linear predictor), ``median_relative_growth``,
    ``expected_relative_growth`` (E[r], capped lognormal mean), ``expected_growth_ml``,
    ``expected_followup_ml`` and ``p_expansion`` (probability the paper's rule fires).
    """
    mu = linear_predictor(clinical, law)
    sd = float(law["noise_sd"])
    cap = float(law["max_relative_growth"])
    log_cap = math.log(cap)
    if sd > 0:
        mean_r = math.exp(mu + sd * sd / 2) * _phi((log_cap - mu - sd * sd) / sd) + cap * (1 - _phi((log_cap - mu) / sd))
    else:
        mean_r = min(math.exp(mu), cap)
    v0 = float(clinical["baseline_iph_ml"])
    thr = expansion_eta_threshold(v0)
    if thr > log_cap:
        p_exp = 0.0
    elif sd > 0:
        p_exp = 1.0 - _phi((thr - mu) / sd)
    else:
        p_exp = float(mu >= thr)
    return {
        "expected_log_relative_growth": mu,
        "median_relative_growth": min(math.exp(mu), cap),
        "expected_relative_growth": mean_r,
        "expected_growth_ml": v0 * mean_r,
        "expected_followup_ml": v0 * (1.0 + mean_r),
        "p_expansion": p_exp,
    }


def _mean_r_above(mu: float, sd: float, cap: float, lower: float) -> float:
    """E[min(exp(eta), cap) * 1{eta >= lower}] for eta ~ N(mu, sd^2), sd > 0 (closed form)."""
    log_cap = math.log(cap)
    capped = cap * (1 - _phi((max(lower, log_cap) - mu) / sd))
    if lower >= log_cap:
        return capped
    return math.exp(mu + sd * sd / 2) * (_phi((log_cap - mu - sd * sd) / sd) - _phi((lower - mu - sd * sd) / sd)) + capped


def expected_followup_given_flag(clinical: Mapping[str, float], law: Mapping[str, float], flag: int) -> float:
    """E[follow-up IPH mL | clinical values, expansion flag]: the law's truth for a flag-conditioned model.

    A model conditioned on the expansion flag is asked for the follow-up *given* the flag, so its
    clinical effects must be compared with the law's expectation on the same side of the expansion
    threshold (eta >= threshold for flag 1, below it for flag 0), not with the unconditional
    expectation of :func:`expected_growth`. Closed form for the capped lognormal; where the flag has
    (numerically) zero probability, the growth at the threshold, the limit of the conditional mean.
    """
    mu = linear_predictor(clinical, law)
    sd = float(law["noise_sd"])
    cap = float(law["max_relative_growth"])
    v0 = float(clinical["baseline_iph_ml"])
    thr = expansion_eta_threshold(v0)
    if sd <= 0:
        return v0 * (1.0 + min(math.exp(mu), cap))
    p1 = 1.0 - _phi((thr - mu) / sd)
    total = expected_growth(clinical, law)["expected_relative_growth"]
    above = _mean_r_above(mu, sd, cap, thr)
    mass, part = (p1, above) if flag else (1.0 - p1, total - above)
    if mass < 1e-12:
        return v0 * (1.0 + min(math.exp(thr), cap))
    return v0 * (1.0 + part / mass)


def predictive_relative_growth(clinical: Mapping[str, float], law: Mapping[str, float], n: int,
                               flag: int | None = None) -> list[float]:
    """``n`` equally weighted points of the law's own predictive distribution of relative growth r.

    The oracle forecast of the validity study: the best any model can do, since the law is known. Points
    are the mid-quantiles ``(i + 1/2) / n`` of eta ~ N(mu, noise_sd^2), restricted to the flag's side
    of the expansion threshold when ``flag`` is given (a flag-conditioned model is asked for the
    follow-up *given* the flag), then capped like :func:`realised_growth`. Quantiles rather than random
    draws keep this module free of randomness and make the oracle's CRPS reproducible to the digit.
    """
    mu = linear_predictor(clinical, law)
    sd, cap = float(law["noise_sd"]), float(law["max_relative_growth"])
    if sd <= 0 or n < 1:
        return [min(math.exp(mu), cap)] * max(n, 0)
    lo, hi = 0.0, 1.0
    if flag is not None:
        p_below = _phi((expansion_eta_threshold(float(clinical["baseline_iph_ml"])) - mu) / sd)
        lo, hi = (p_below, 1.0) if flag else (0.0, p_below)
        if hi - lo < 1e-12:  # the flag is (numerically) impossible: its limit, the threshold itself
            lo = hi = min(max(p_below, 1e-12), 1.0 - 1e-12)
    out = []
    for i in range(n):
        u = lo + (hi - lo) * (i + 0.5) / n
        eta = mu + sd * _phi_inverse(min(max(u, 1e-15), 1.0 - 1e-15))
        out.append(min(math.exp(eta), cap))
    return out


def _phi_inverse(p: float) -> float:
    return float(NormalDist().inv_cdf(p))


def realised_growth(clinical: Mapping[str, float], law: Mapping[str, float], noise: float) -> dict[str, float]:
    """Growth of one patient given its noise draw (``noise`` is on the eta scale, sd = noise_sd)."""
    eta = linear_predictor(clinical, law) + float(noise)
    r = min(math.exp(eta), float(law["max_relative_growth"]))
    v0 = float(clinical["baseline_iph_ml"])
    return {
        "eta": eta,
        "relative_growth": r,
        "growth_ml": v0 * r,
        "followup_ml": v0 * (1.0 + r),
        "expansion": bool(eta >= expansion_eta_threshold(v0)),
    }


def allowed_expander_counts(n: int, fraction: Sequence[float]) -> tuple[int, int]:
    """(min, max) number of expanders among ``n`` patients for a fraction range; raises if empty."""
    lo = math.ceil(fraction[0] * n - 1e-9)
    hi = math.floor(fraction[1] * n + 1e-9)
    if lo > hi:
        raise ValueError(
            f"no whole number of expanders among {n} patients lies in the fraction range "
            f"[{fraction[0]}, {fraction[1]}]; widen cohort.synthetic.expander_fraction or change the site sizes"
        )
    return lo, hi


def calibrate_noise(
    mu: Sequence[float], noise: Sequence[float], baseline_ml: Sequence[float],
    fraction: Sequence[float], margin: float,
) -> tuple[list[float], list[bool]]:
    """Deterministically nudge the fewest patient noises so one split meets the expander fraction.

    Step 1 moves any eta closer than ``margin`` to its expansion threshold to ``threshold +/- margin``
    (keeping its side), so voxel rounding of the written masks cannot flip a label. Step 2, only if the
    split's expander count is outside :func:`allowed_expander_counts`, flips the patients closest to
    the threshold (smallest change of noise) one at a time. Labels still follow from the law: each
    patient's eta = mu + (possibly nudged) noise. Returns (new noises, adjusted flags).
    """
    thr = [expansion_eta_threshold(v) for v in baseline_ml]
    gap = [m + e - t for m, e, t in zip(mu, noise, thr, strict=True)]
    for i, g in enumerate(gap):
        if abs(g) < margin:
            gap[i] = margin if g >= 0 else -margin
    lo, hi = allowed_expander_counts(len(gap), fraction)
    while sum(g >= 0 for g in gap) < lo:
        i = min((i for i, g in enumerate(gap) if g < 0), key=lambda i: (-gap[i], i))
        gap[i] = margin
    while sum(g >= 0 for g in gap) > hi:
        i = min((i for i, g in enumerate(gap) if g >= 0), key=lambda i: (gap[i], i))
        gap[i] = -margin
    new = [g - m + t for g, m, t in zip(gap, mu, thr, strict=True)]
    adjusted = [abs(a - b) > 1e-12 for a, b in zip(new, noise, strict=True)]
    return [n if not a else float(v) for n, v, a in zip(noise, new, adjusted, strict=True)], adjusted
