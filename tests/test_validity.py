"""Validity study scoring (hemexp.evaluation.validity): known answers on models whose behaviour is exact.

A "law model" samples from the growth law's own predictive distribution given the true flag, so it
must score like the oracle (CRPS ratio ~1, coverage at its calibrated value, adherence 100 % / 0 %,
learned effects equal to the law's); a "copy model" returns the baseline, so it must score exactly
like copy-baseline and never expand. Scores are checked against closed forms where they exist.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scoringrules as sr

from hemexp.cohort.synth.law import (
    expansion_eta_threshold,
    expected_followup_given_flag,
    expected_growth,
    linear_predictor,
    predictive_relative_growth,
)
from hemexp.core.clinical import is_expansion
from hemexp.evaluation.validity import tables as T
from hemexp.evaluation.validity.scores import fair_crps, patient_bootstrap, ratio_of_means
from hemexp.sampling.scenarios import UNPERTURBED, Scenario, parse_scenarios

LAW = {"intercept": -1.6, "log_onset_h": -0.5, "anticoagulant": 0.8, "antiplatelet": 0.3, "sbp_per_10mmhg": 0.1,
       "gcs_per_point": -0.08, "age_per_10y": 0.05, "log_baseline_ml": 0.1, "noise_sd": 0.7,
       "max_relative_growth": 3.0}
SCENARIOS = {UNPERTURBED: Scenario(UNPERTURBED), **parse_scenarios(
    {"anticoagulant_toggled": {"anticoagulant": "toggle"}, "onset_plus_6h": {"onset_to_ct_h": {"add": 6}}})}
PROFILES = parse_scenarios({"expansion_favouring": {"anticoagulant": {"set": 1}, "onset_to_ct_h": {"set": 0.5}},
                            "stable": {"anticoagulant": {"set": 0}, "onset_to_ct_h": {"add": 6}}})
BOOT = T.Bootstrap(300, 0.95, 0)


def _clinical(rng: np.random.Generator) -> dict[str, float]:
    return {"onset_to_ct_h": float(rng.uniform(0.5, 8)), "baseline_iph_ml": float(rng.uniform(5, 40)),
            "anticoagulant": float(rng.integers(0, 2)), "antiplatelet": float(rng.integers(0, 2)),
            "age": float(rng.uniform(50, 85)), "gcs": float(rng.integers(8, 16)), "sbp": float(rng.uniform(130, 200))}


@pytest.mark.parametrize("flag", [None, 0, 1])
def test_oracle_points_have_the_laws_closed_form_mean(flag):
    c = {"onset_to_ct_h": 2.0, "baseline_iph_ml": 15.0, "anticoagulant": 1.0, "antiplatelet": 0.0, "age": 70.0,
         "gcs": 14.0, "sbp": 170.0}
    r = np.asarray(predictive_relative_growth(c, LAW, 4000, flag))
    v0 = c["baseline_iph_ml"]
    expected = (expected_growth(c, LAW)["expected_relative_growth"] if flag is None
                else expected_followup_given_flag(c, LAW, flag) / v0 - 1.0)
    assert r.mean() == pytest.approx(expected, rel=2e-3)
    eta_thr = expansion_eta_threshold(v0)
    if flag is not None:  # every point is on the flag's side of the expansion threshold
        assert np.all((np.log(r) >= eta_thr - 1e-9) if flag else (np.log(r) < eta_thr))


def test_fair_crps_is_unbiased_for_the_distribution_it_samples():
    rng = np.random.default_rng(1)
    y = 0.7
    closed = float(sr.crps_normal(y, 0.0, 1.0))  # y(2Φ(y) − 1) + 2φ(y) − 1/√π
    fair = np.mean([fair_crps(rng.normal(size=5), y) for _ in range(20000)])
    assert fair == pytest.approx(closed, abs=0.01)
    # the plain ensemble estimator of 5 samples is biased upwards by E|X − X'| / (2N) ~ 0.11 here
    plain = np.mean([float(sr.crps_ensemble(y, rng.normal(size=5), estimator="nrg")) for _ in range(5000)])
    assert plain - closed > 0.08


def test_patient_bootstrap_intervals():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 1.0, 200)
    est, lo, hi = patient_bootstrap([x], np.mean, 500, 0.95, 0)
    assert lo < est < hi and hi - lo == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.25)
    assert patient_bootstrap([np.full(10, 2.0)], np.mean, 500, 0.95, 0) == (2.0, 2.0, 2.0)
    est, lo, hi = patient_bootstrap([2 * x, x], ratio_of_means, 500, 0.95, 0)
    assert est == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    assert all(math.isnan(v) for v in patient_bootstrap([np.array([np.nan])], np.mean, 500, 0.95, 0))


def _cohort(n: int, seed: int) -> pd.DataFrame:
    """Test patients drawn from LAW, grid volumes = law volumes, no IVH."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c = _clinical(rng)
        eta = linear_predictor(c, LAW) + rng.normal(0, LAW["noise_sd"])
        r = min(math.exp(eta), LAW["max_relative_growth"])
        fu = c["baseline_iph_ml"] * (1 + r)
        rows.append({"patient_id": f"P{i:03d}", **c, "true_flag": int(is_expansion(c["baseline_iph_ml"], fu)),
                     "truth_iph_ml": fu, "truth_ivh_ml": 0.0, "truth_total_ml": fu,
                     "grid_baseline_iph_ml": c["baseline_iph_ml"], "grid_baseline_ivh_ml": 0.0})
    return pd.DataFrame(rows)


def _row(pid, part, scenario, kind, scale, k, flag, iph, base):
    return {"patient_id": pid, "part": part, "scenario": scenario, "kind": kind, "guidance_scale": scale,
            "sample": k, "flag": flag, "iph_ml": iph, "ivh_ml": 0.0, "total_ml": iph, "baseline_iph_ml": base,
            "baseline_total_ml": base}


def _volumes(patients: pd.DataFrame, model: str, n: int = 20, n_effect: int = 40, seed: int = 3) -> pd.DataFrame:
    """Validity rows of a model that samples the law ('law') or copies the baseline ('copy')."""
    from hemexp.sampling.scenarios import apply_scenario

    rng = np.random.default_rng(seed)
    clin_cols = ["onset_to_ct_h", "baseline_iph_ml", "anticoagulant", "antiplatelet", "age", "gcs", "sbp"]
    rows = []

    def draw(c, k, pool):
        return c["baseline_iph_ml"] if model == "copy" else c["baseline_iph_ml"] * (1 + pool[k])

    for p in patients.to_dict("records"):
        c, b = {k: p[k] for k in clin_cols}, p["baseline_iph_ml"]
        for flag in (1, 0):
            pool = rng.choice(predictive_relative_growth(c, LAW, 1000, flag), n)  # random draws from the law
            for k in range(n):
                rows.append(_row(p["patient_id"], "calibration", UNPERTURBED, "scenario", 1.0, k, flag,
                                 draw(c, k, pool), b))
        settings = [(name, "scenario", 1.0, sc) for name, sc in SCENARIOS.items()]
        settings += [(name, "profile", w, sc) for w in (0.0, 1.0) for name, sc in PROFILES.items()]
        for name, kind, w, sc in settings:
            cc = apply_scenario(c, sc)
            pool = predictive_relative_growth(cc, LAW, n_effect, p["true_flag"])  # common quantiles = CRN
            for k in range(n_effect):
                rows.append(_row(p["patient_id"], "effect", name, kind, w, k, p["true_flag"],
                                 draw(cc, k, pool), b))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def cohort():
    return _cohort(120, 0)


def test_a_model_sampling_the_law_scores_like_the_oracle(cohort):
    vols = _volumes(cohort, "law")
    scores = T.patient_scores(vols, cohort, LAW, True, [0.5, 0.8], 2000, 0)
    cal = T.calibration_table(scores, [0.5, 0.8], BOOT).set_index(["volume", "quantity"])["estimate"]
    assert cal[("iph", "CRPS model / oracle")] == pytest.approx(1.0, abs=0.12)
    assert cal[("iph", "CRPS model / copy")] < 0.8
    assert cal[("iph", "coverage 80 %")] == pytest.approx(T.expected_coverage(20, 0.8), abs=0.12)
    # the flag is information: the oracle given the true flag beats the oracle without it
    assert cal[("iph", "CRPS oracle (mL)")] < cal[("iph", "CRPS oracle_no_flag (mL)")]
    adh = T.adherence_table(vols, BOOT).set_index("requested_flag")["estimate"]
    assert adh[1] == 1.0 and adh[0] == 0.0
    eff = T.effect_table(vols, cohort, SCENARIOS, LAW, 1.0, True, BOOT).set_index("scenario")
    assert eff["ratio"].between(0.9, 1.1).all()
    assert eff["sign_ok"].all()
    targets = T.targets_table(eff.reset_index(), pd.DataFrame(), T.adherence_table(vols, BOOT),
                              T.calibration_table(scores, [0.5, 0.8], BOOT), True).set_index("target")["met"]
    assert targets["adherence flag 1 >= 80 %"] and targets["adherence flag 0 <= 10 %"]
    assert targets["fair CRPS <= 1.5x oracle (iph)"] and targets["every effect has the law's sign"]


def test_a_copy_model_scores_exactly_like_copy_baseline(cohort):
    vols = _volumes(cohort, "copy", n=5, n_effect=2)
    scores = T.patient_scores(vols, cohort, LAW, True, [0.8], 500, 0)
    assert np.allclose(scores["crps_model"], scores["crps_copy"])
    adh = T.adherence_table(vols, BOOT).set_index("requested_flag")["estimate"]
    assert adh[1] == 0.0
    eff = T.effect_table(vols, cohort, SCENARIOS, LAW, 1.0, True, BOOT)
    assert np.allclose(eff["learned_ml"], 0.0) and not eff["ratio_in_0.5_2"].any()
    targets = T.targets_table(eff, pd.DataFrame(), adh.reset_index().assign(estimate=adh.values),
                              T.calibration_table(scores, [0.8], BOOT), True)
    assert not targets.set_index("target")["met"]["fair CRPS below copy-baseline (iph)"]


def test_guidance_table_measures_separation_per_scale(cohort):
    vols = _volumes(cohort.head(30), "law", n=2, n_effect=10)
    vols.loc[(vols["kind"] == "profile") & (vols["guidance_scale"] == 0.0), "total_ml"] = vols["baseline_total_ml"]
    g = T.guidance_table(vols, cohort.head(30), PROFILES, LAW, True, BOOT)
    assert list(g["guidance_scale"]) == [0.0, 1.0]
    assert g["separation_ml"].iloc[0] == pytest.approx(0.0)
    assert g["separation_ml"].iloc[1] == pytest.approx(g["true_separation_ml"].iloc[1], rel=0.1)
    assert set(g["guidance_rule"]) == {"cfg"}  # samples without the column are plain CFG


def test_guidance_table_scores_each_rule_on_its_own_rows(cohort):
    """A second rule's profile rows (here: no separation at all) get their own sweep and target line."""
    vols = _volumes(cohort.head(30), "law", n=2, n_effect=10).assign(guidance_rule="cfg")
    other = vols[vols["kind"] == "profile"].assign(guidance_rule="projected")
    other["total_ml"] = other["baseline_total_ml"]
    g = T.guidance_table(pd.concat([vols, other]), cohort.head(30), PROFILES, LAW, True, BOOT)
    assert list(g["guidance_rule"]) == ["cfg", "cfg", "projected", "projected"]
    assert np.allclose(g[g["guidance_rule"] == "projected"]["separation_ml"], 0.0)
    cfg_rows = g[g["guidance_rule"] == "cfg"].reset_index(drop=True)
    plain = T.guidance_table(vols, cohort.head(30), PROFILES, LAW, True, BOOT)
    assert np.allclose(cfg_rows["separation_ml"], plain["separation_ml"])
    targets = T.targets_table(pd.DataFrame(), g, pd.DataFrame(), pd.DataFrame(columns=["volume", "quantity", "estimate"]), True)
    met = targets.set_index("target")["met"]
    assert not met["guidance separation grows with the scale (projected)"]
    assert "guidance separation grows with the scale" in met


class _ScaledDeltaModel:
    """A stand-in denoiser with a known x0 prediction: ``gain(flag) · baseline`` in Δz units (so with
    baseline = Δz it explains 1 − (1 − gain)² of Δz exactly, at every noise level), in a model space of
    scale 2; it ignores the clinical input."""

    delta_scale, uses_flag, uses_clinical = 2.0, True, True

    def __init__(self, sched):
        import torch

        self.sched, self._p = sched, torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._p])

    def __call__(self, x_t, t, baseline, clinical, flag, drop):
        a = self.sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (0.5 * flag.view(-1, 1, 1, 1)) * baseline / self.delta_scale
        return (a.sqrt() * x_t - x0) / (1 - a).sqrt()  # the v whose x0 is the one above


def test_denoising_fit_measures_explained_change_and_the_flag_penalty_exactly():
    """Known answers: Δz = baseline and x0 = 0.5 · baseline under flag 1 -> explained 0.75 at every
    step; flipping every flag to 0 predicts no change -> error 4x -> penalty 3; nulling the clinical
    input changes nothing -> penalty 0."""
    from test_latents import fake_latents

    from hemexp.diffusion.lesion import near_baseline_hematoma
    from hemexp.diffusion.model import ddpm_scheduler
    from hemexp.diffusion.train import LatentPairs
    from hemexp.evaluation.validity.diagnostics import NOISE_STEPS, denoising_fit, fit_summary

    sched_cfg = {"num_train_timesteps": 1000, "schedule": "sigmoid_beta", "prediction_type": "v_prediction"}
    lats = []
    for i in range(3):
        lat = fake_latents(f"P{i}", "train", flag=1, seed=i)
        lats.append(lat.__class__(**{**lat.__dict__, "z_fu": 2 * lat.z_bl}))  # normalised Δz = z_bl
    pairs = LatentPairs(lats, {"mean": [0.0] * 4, "std": [1.0] * 4}, context=1, step_slices=1)
    fit = denoising_fit(_ScaledDeltaModel(ddpm_scheduler(sched_cfg)), sched_cfg, pairs, seed=0, batch_size=5)
    summary = fit_summary(fit)
    assert len(fit["true"]) == len(NOISE_STEPS)
    np.testing.assert_allclose(summary["explained"], 0.75, atol=1e-5)
    np.testing.assert_allclose(summary["flag_flip_penalty"], 3.0, rtol=1e-4)
    np.testing.assert_allclose(summary["null_clinical_penalty"], 0.0, atol=1e-6)
    np.testing.assert_allclose(summary["explained_near"], 0.75, atol=1e-5)  # the error is 1/4 of Δz² in every cell
    near = np.concatenate([near_baseline_hematoma(lat.iph_bl_cells)[lat.target_rows] for lat in lats])[:, None]
    delta = np.concatenate([lat.z_bl[lat.target_rows] for lat in lats]).astype(np.float64)
    assert 0 < near.mean() < 1
    np.testing.assert_allclose(summary["near_energy_share"], (delta**2 * near).sum() / (delta**2).sum(), rtol=1e-5)


def test_truth_adherence_counts_true_follow_ups_that_expand_by_the_rule_per_flag_and_measure():
    """Known answers: baseline 10 mL; expanders' truths 14 (40 %, expands) and 12 (20 %, does not) on
    the grid, both 12.9 after decoding (29 %, neither); the non-expander's 10.5 nowhere expands."""
    from hemexp.evaluation.validity.tables import Bootstrap, truth_adherence_table

    def patient(flag: int, grid: float, decoded: float) -> dict:
        return {"true_flag": flag, "baseline_iph_ml": 10.0, "truth_iph_ml": {"grid": grid, "decoded_absolute": decoded}}

    per_patient = [patient(1, 14.0, 12.9), patient(1, 12.0, 12.9), patient(0, 10.5, 10.5), {"true_flag": 0}]
    table = truth_adherence_table(per_patient, Bootstrap(200, 0.95, 0)).set_index(["measured_on", "true_flag"])
    assert table.loc[("grid", 1), "estimate"] == pytest.approx(0.5)
    assert table.loc[("decoded_absolute", 1), "estimate"] == 0.0
    assert table.loc[("grid", 0), "estimate"] == 0.0 and table.loc[("grid", 0), "n_patients"] == 1
    assert table.loc[("grid", 1), "ci_low"] <= 0.5 <= table.loc[("grid", 1), "ci_high"]
    assert truth_adherence_table([{"true_flag": 1}], Bootstrap(10, 0.95, 0)).empty  # an older run's diagnostics
