"""The validity study's tables: learned vs law effects, guidance sweep, adherence, calibration, CRPS, targets.

Everything is scored per test patient first (a patient's mean effect, share of expanding samples,
interval hit, CRPS) and then summarised over patients with a patient-bootstrap 95 % interval
(:func:`hemexp.evaluation.validity.scores.patient_bootstrap`). Like with like throughout: a
flag-conditioned variant is sampled under each patient's true flag, so its "true" effects and its
oracle are the law's *given that flag*; a variant without the flag is compared with the law's
unconditional expectation and predictive distribution.

Volumes: samples and truths are measured on the model grid (``volumes.tsv`` semantics). The law acts
on IPH; the oracle's IPH follow-up is the grid baseline IPH times ``1 + r``, and its total adds the
patient's *realised* IVH change (the law does not model IVH), which makes the total-volume oracle a
slightly optimistic lower bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from hemexp.cohort.synth.law import predictive_relative_growth
from hemexp.core.clinical import is_expansion
from hemexp.evaluation.calibration import expected_coverage, pit_rank
from hemexp.evaluation.guidance.effects import FAVOURING, STABLE, patient_deltas, true_patient_deltas
from hemexp.evaluation.validity.names import CALIBRATION, EFFECT
from hemexp.evaluation.validity.scores import (
    distribution_crps,
    fair_crps,
    mean,
    patient_bootstrap,
    point_crps,
    ratio_of_means,
)
from hemexp.sampling.intervals import empirical_interval
from hemexp.sampling.scenarios import UNPERTURBED, Scenario

QUANTITIES = {"total": "total_ml", "iph": "iph_ml"}


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: resamples, confidence level, seed."""

    n_resamples: int
    ci: float
    seed: int

    def __call__(self, columns: Sequence[Sequence[float]], statistic: Any = mean) -> tuple[float, float, float]:
        return patient_bootstrap(columns, statistic, self.n_resamples, self.ci, self.seed)


def _interval_row(name: str, est: tuple[float, float, float], **extra: Any) -> dict[str, Any]:
    return {"quantity": name, "estimate": est[0], "ci_low": est[1], "ci_high": est[2], **extra}


def _true_flag_shares(patients: pd.DataFrame, settings: Sequence[str]) -> dict[tuple[str, str], float]:
    """(patient, setting) -> share of flag-1 samples: every setting is sampled under the true flag."""
    return {(p, name): float(f) for p, f in zip(patients["patient_id"], patients["true_flag"], strict=True)
            for name in settings}


# ---------------------------------------------------------------------------- effects
def effect_table(volumes: pd.DataFrame, patients: pd.DataFrame, scenarios: Mapping[str, Scenario],
                 law: Mapping[str, float], scale: float, uses_flag: bool, boot: Bootstrap) -> pd.DataFrame:
    """Learned vs true ΔV (total, mL) per single-variable scenario, with intervals and the target checks."""
    rows = volumes[(volumes["part"] == EFFECT) & (volumes["kind"] == "scenario")
                   & (volumes["guidance_scale"] == float(scale))]
    if rows.empty:
        return pd.DataFrame()
    learned = patient_deltas(rows.drop(columns="guidance_scale"), UNPERTURBED, "total_ml")
    learned = learned[learned["scenario"] != UNPERTURBED][["patient_id", "scenario", "delta_ml"]]
    shares = _true_flag_shares(patients, scenarios) if uses_flag else None
    truth = true_patient_deltas(patients, scenarios, law, UNPERTURBED, flag_share=shares)
    both = learned.merge(truth, on=["patient_id", "scenario"], how="inner")
    out = []
    for name, g in both.groupby("scenario", sort=False):
        lv, tv = g["delta_ml"].to_numpy(), g["true_delta_ml"].to_numpy()
        lm, tm = boot([lv]), boot([tv])
        ratio = boot([lv, tv], ratio_of_means)
        excludes_zero = lm[1] > 0 or lm[2] < 0
        out.append({"scenario": name, "n_patients": len(g), "learned_ml": lm[0], "learned_low": lm[1],
                    "learned_high": lm[2], "true_ml": tm[0], "true_low": tm[1], "true_high": tm[2],
                    "ratio": ratio[0], "ratio_low": ratio[1], "ratio_high": ratio[2],
                    "sign_ok": bool(np.sign(lm[0]) == np.sign(tm[0])),
                    "ci_excludes_0": bool(excludes_zero),
                    "ratio_in_0.5_2": bool(0.5 <= ratio[0] <= 2.0)})
    return pd.DataFrame(out)


def guidance_table(volumes: pd.DataFrame, patients: pd.DataFrame, profiles: Mapping[str, Scenario],
                   law: Mapping[str, float], uses_flag: bool, boot: Bootstrap) -> pd.DataFrame:
    """Per guidance rule and scale: learned separation ΔV(favouring) − ΔV(stable) with its interval, and
    the law's. Rules in the order sampled (the configured rule first)."""
    rows = volumes[(volumes["part"] == EFFECT) & (volumes["kind"] == "profile")]
    if rows.empty:
        return pd.DataFrame()
    if "guidance_rule" not in rows:  # samples from before the rule column: all plain CFG
        rows = rows.assign(guidance_rule="cfg")
    settings = {"base": Scenario(UNPERTURBED), **profiles}
    shares = _true_flag_shares(patients, settings) if uses_flag else None
    law_sep = true_patient_deltas(patients, settings, law, "base", flag_share=shares)
    law_sep = law_sep.pivot(index="patient_id", columns="scenario", values="true_delta_ml")
    true_sep = (law_sep[FAVOURING] - law_sep[STABLE]).rename("true_separation")
    out = []
    for rule, by_rule in rows.groupby("guidance_rule", sort=False):
        deltas = patient_deltas(by_rule.drop(columns="guidance_rule"), "baseline", "total_ml")
        wide = deltas.pivot_table(index=["guidance_scale", "patient_id"], columns="scenario",
                                  values="delta_ml").reset_index()
        for scale, g in wide.groupby("guidance_scale"):
            est = boot([(g[FAVOURING] - g[STABLE]).to_numpy()])
            out.append({"guidance_rule": rule, "guidance_scale": float(scale), "n_patients": len(g),
                        "separation_ml": est[0], "separation_low": est[1], "separation_high": est[2],
                        "true_separation_ml": float(true_sep.reindex(g["patient_id"]).mean())})
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------- adherence, calibration
def adherence_table(volumes: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """Share of samples that expand by the paper's rule (IPH vs the grid baseline), per requested flag."""
    rows = volumes[volumes["part"] == CALIBRATION]
    expands = [is_expansion(b, f) for b, f in zip(rows["baseline_iph_ml"], rows["iph_ml"], strict=True)]
    per_patient = rows.assign(expands=np.asarray(expands, float)).groupby(["flag", "patient_id"])["expands"].mean()
    out = []
    for flag in (1, 0):
        if flag in per_patient.index.get_level_values(0):
            vals = per_patient.loc[flag].to_numpy()
            out.append(_interval_row(f"P(expand | flag {flag})", boot([vals]), requested_flag=flag,
                                     n_patients=len(vals)))
    return pd.DataFrame(out)


def truth_adherence_table(per_patient: Sequence[Mapping[str, Any]], boot: Bootstrap) -> pd.DataFrame:
    """Share of test patients whose *true* follow-up expands by the paper's rule (vs the grid baseline),
    per true flag and per way of measuring it (``truth_iph_ml`` of the study's diagnostics: the grid,
    the sampled slices, each decode mode): the adherence a perfect model could reach on this grid,
    slice range and VAE. Rows without the truth (diagnostics of an older run) give an empty table."""
    rows = [p for p in per_patient if "truth_iph_ml" in p]
    out = []
    for measure in dict.fromkeys(k for p in rows for k in p["truth_iph_ml"]):
        for flag in (1, 0):
            vals = [float(is_expansion(p["baseline_iph_ml"], p["truth_iph_ml"][measure]))
                    for p in rows if int(p["true_flag"]) == flag]
            if vals:
                out.append(_interval_row(f"P(true follow-up expands | true flag {flag})", boot([vals]),
                                         measured_on=measure, true_flag=flag, n_patients=len(vals)))
    return pd.DataFrame(out)


def oracle_points(patient: Mapping[str, Any], law: Mapping[str, float], n: int, flag: int | None) -> dict[str, np.ndarray]:
    """The law's predictive follow-up volumes (grid mL) of one patient: IPH and total."""
    r = np.asarray(predictive_relative_growth(patient, law, n, flag))
    iph = patient["grid_baseline_iph_ml"] * (1.0 + r)
    ivh_change = patient["truth_ivh_ml"] - patient["grid_baseline_ivh_ml"]
    total = patient["grid_baseline_iph_ml"] + patient["grid_baseline_ivh_ml"] + patient["grid_baseline_iph_ml"] * r + ivh_change
    return {"iph": iph, "total": total}


def patient_scores(volumes: pd.DataFrame, patients: pd.DataFrame, law: Mapping[str, float], uses_flag: bool,
                   levels: Sequence[float], oracle_draws: int, seed: int) -> pd.DataFrame:
    """One row per (patient, quantity): interval hits, PIT rank and the CRPS of model, oracles and copy."""
    rng = np.random.default_rng(seed)
    rows = volumes[volumes["part"] == CALIBRATION]
    out = []
    for p in patients.to_dict("records"):
        flag = int(p["true_flag"])
        # a variant without the flag sampled identical flag-1 and flag-0 sets: score one of them
        mine = rows[(rows["patient_id"] == p["patient_id"]) & (rows["flag"] == (flag if uses_flag else 0))]
        if mine.empty:
            continue
        oracle = oracle_points(p, law, oracle_draws, flag if uses_flag else None)
        oracle_any = oracle_points(p, law, oracle_draws, None)
        for q, col in QUANTITIES.items():
            x, y = mine[col].to_numpy(float), float(p[f"truth_{q}_ml"])
            base = float(p["grid_baseline_iph_ml"] if q == "iph" else
                         p["grid_baseline_iph_ml"] + p["grid_baseline_ivh_ml"])
            rec = {"patient_id": p["patient_id"], "quantity": q, "n_samples": len(x), "truth_ml": y,
                   "median_ml": float(np.median(x)), "pit_rank": pit_rank(x, y, rng),
                   "crps_model": fair_crps(x, y), "crps_oracle": distribution_crps(oracle[q], y),
                   "crps_oracle_no_flag": distribution_crps(oracle_any[q], y), "crps_copy": point_crps(base, y)}
            for level in levels:
                lo, hi = empirical_interval(x, level)
                rec[f"covered_{int(round(level * 100))}"] = float(lo <= y <= hi)
            out.append(rec)
    return pd.DataFrame(out)


def calibration_table(scores: pd.DataFrame, levels: Sequence[float], boot: Bootstrap) -> pd.DataFrame:
    """Coverage (with the calibrated model's expected value), CRPS of model / oracle / copy and ratios."""
    out = []
    for q, g in scores.groupby("quantity", sort=False):
        n = int(g["n_samples"].min())
        for level in levels:
            key = f"covered_{int(round(level * 100))}"
            out.append(_interval_row(f"coverage {int(round(level * 100))} %", boot([g[key]]), volume=q,
                                     expected=expected_coverage(n, level)))
        for who in ("model", "oracle", "oracle_no_flag", "copy"):
            out.append(_interval_row(f"CRPS {who} (mL)", boot([g[f"crps_{who}"]]), volume=q))
        out.append(_interval_row("CRPS model / oracle", boot([g["crps_model"], g["crps_oracle"]], ratio_of_means),
                                 volume=q))
        out.append(_interval_row("CRPS model / copy", boot([g["crps_model"], g["crps_copy"]], ratio_of_means),
                                 volume=q))
    return pd.DataFrame(out)


def pit_counts(scores: pd.DataFrame, quantity: str) -> np.ndarray:
    g = scores[scores["quantity"] == quantity]
    n = int(g["n_samples"].min()) if len(g) else 0
    return np.bincount(g["pit_rank"].astype(int), minlength=n + 1)


# ---------------------------------------------------------------------------- targets
def targets_table(effects: pd.DataFrame, guidance: pd.DataFrame, adherence: pd.DataFrame,
                  calibration: pd.DataFrame, uses_flag: bool) -> pd.DataFrame:
    """The issue's targets, each with the measured value and whether it holds (None: not applicable)."""
    rows: list[dict[str, Any]] = []

    def add(target: str, value: str, ok: bool | None) -> None:
        rows.append({"target": target, "measured": value, "met": ok})

    if not effects.empty:
        add("every effect has the law's sign", f"{int(effects['sign_ok'].sum())}/{len(effects)}",
            bool(effects["sign_ok"].all()))
        big = effects[effects["true_ml"].abs() > 1.0]
        add("95 % interval excludes 0 where the law's effect exceeds 1 mL", f"{int(big['ci_excludes_0'].sum())}/{len(big)}",
            bool(big["ci_excludes_0"].all()) if len(big) else None)
        add("every effect within 0.5x-2x of the law's", f"{int(effects['ratio_in_0.5_2'].sum())}/{len(effects)}",
            bool(effects["ratio_in_0.5_2"].all()))
    for i, (rule, g) in enumerate(guidance.groupby("guidance_rule", sort=False) if not guidance.empty else ()):
        sep = g.sort_values("guidance_scale")["separation_ml"].to_numpy()
        add("guidance separation grows with the scale" + ("" if i == 0 else f" ({rule})"),
            " < ".join(f"{v:.2f}" for v in sep), bool(np.all(np.diff(sep) > 0)))
    if uses_flag and not adherence.empty:
        a = adherence.set_index("requested_flag")["estimate"]
        add("adherence flag 1 >= 80 %", f"{a.get(1, np.nan):.1%}", bool(a.get(1, 0) >= 0.8))
        add("adherence flag 0 <= 10 %", f"{a.get(0, np.nan):.1%}", bool(a.get(0, 1) <= 0.1))
    for q in QUANTITIES:
        c = calibration[calibration["volume"] == q].set_index("quantity")["estimate"]
        if "coverage 80 %" in c:
            add(f"80 % interval coverage in 70-90 % ({q})", f"{c['coverage 80 %']:.1%}",
                bool(0.7 <= c["coverage 80 %"] <= 0.9))
            add(f"fair CRPS <= 1.5x oracle ({q})", f"{c['CRPS model / oracle']:.2f}x",
                bool(c["CRPS model / oracle"] <= 1.5))
            add(f"fair CRPS below copy-baseline ({q})", f"{c['CRPS model / copy']:.2f}x",
                bool(c["CRPS model / copy"] < 1.0))
    return pd.DataFrame(rows)
