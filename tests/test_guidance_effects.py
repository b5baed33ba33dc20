"""Scenario application (with clamping), ΔV bookkeeping, guidance separation and learned-vs-true."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from hemexp.core.config import DEFAULT_CONFIG
from hemexp.evaluation.guidance.effects import (
    FAVOURING,
    STABLE,
    guidance_separation,
    learned_vs_true,
    patient_deltas,
    perturbation_effects,
    sign_agreement,
)
from hemexp.sampling.scenarios import UNPERTURBED, apply_scenario, parse_scenarios, scenarios_from_config

CLIN = {"patient_id": "P1", "onset_to_ct_h": 20.0, "baseline_iph_ml": 15.0, "anticoagulant": 0.0,
        "antiplatelet": 1.0, "age": 70.0, "gcs": 12.0, "sbp": 230.0}


@pytest.fixture(scope="module")
def scenarios():
    return scenarios_from_config(yaml.safe_load(DEFAULT_CONFIG.read_text())["evaluation"])


def test_config_scenarios_parse(scenarios):
    single, profiles = scenarios
    assert list(single)[0] == UNPERTURBED and single[UNPERTURBED].changes == ()
    assert {"onset_plus_6h", "sbp_plus_30", "gcs_3", "gcs_15", "anticoagulant_toggled",
            "antiplatelet_toggled"} <= set(single)
    assert set(profiles) == {FAVOURING, STABLE}


def test_apply_scenario_clamps_and_toggles(scenarios):
    single, profiles = scenarios
    assert apply_scenario(CLIN, single["onset_plus_6h"])["onset_to_ct_h"] == 24.0  # 26 h clamped to 24
    assert apply_scenario(CLIN, single["sbp_plus_30"])["sbp"] == 250.0  # 260 clamped to 250
    assert apply_scenario(CLIN, single["gcs_3"])["gcs"] == 3.0
    assert apply_scenario(CLIN, single["anticoagulant_toggled"])["anticoagulant"] == 1.0
    assert apply_scenario(CLIN, single["antiplatelet_toggled"])["antiplatelet"] == 0.0
    fav = apply_scenario(CLIN, profiles[FAVOURING])
    assert (fav["onset_to_ct_h"], fav["gcs"], fav["anticoagulant"], fav["antiplatelet"]) == (0.5, 3.0, 1.0, 1.0)
    stable = apply_scenario(CLIN, profiles[STABLE])
    assert (stable["sbp"], stable["gcs"], stable["anticoagulant"]) == (230.0, 15.0, 0.0)
    out = apply_scenario(CLIN, single[UNPERTURBED])
    assert out == CLIN and out is not CLIN  # a copy, untouched
    assert CLIN["onset_to_ct_h"] == 20.0  # input not mutated


def test_bad_scenarios_are_rejected():
    with pytest.raises(ValueError, match="unknown clinical variable"):
        parse_scenarios({"x": {"heart_rate": {"add": 1}}})
    with pytest.raises(ValueError, match="binary"):
        parse_scenarios({"x": {"gcs": "toggle"}})
    with pytest.raises(ValueError, match="expected"):
        parse_scenarios({"x": {"gcs": {"multiply": 2}}})


def _volumes():
    """Two patients; P1 has 2 samples per scenario, P2 one. Means chosen for easy arithmetic."""
    rows = []
    data = {("P1", UNPERTURBED): [10, 12], ("P1", "sbp_plus_30"): [14, 16], ("P1", "gcs_15"): [9, 9],
            ("P2", UNPERTURBED): [20], ("P2", "sbp_plus_30"): [21], ("P2", "gcs_15"): [21]}
    for (pid, scen), vols in data.items():
        rows += [{"patient_id": pid, "scenario": scen, "sample": i, "total_ml": v} for i, v in enumerate(vols)]
    return pd.DataFrame(rows)


def test_perturbation_effects_per_patient_then_mean():
    eff = perturbation_effects(_volumes()).set_index("scenario")
    assert UNPERTURBED not in eff.index
    # sbp: P1 15 - 11 = 4, P2 21 - 20 = 1 -> mean 2.5, sd sqrt(4.5)
    assert eff.loc["sbp_plus_30", "delta_ml_mean"] == pytest.approx(2.5)
    assert eff.loc["sbp_plus_30", "delta_ml_sd"] == pytest.approx(math.sqrt(4.5))
    assert eff.loc["gcs_15", "delta_ml_mean"] == pytest.approx(((9 - 11) + (21 - 20)) / 2)
    assert eff.loc["gcs_15", "n_patients"] == 2


def test_patient_without_reference_is_dropped():
    v = _volumes()
    v = v[~((v["patient_id"] == "P2") & (v["scenario"] == UNPERTURBED))]
    d = patient_deltas(v)
    assert set(d["patient_id"]) == {"P1"}


def _sweep():
    rows = []
    for w in (0.0, 2.0):
        for pid, base in (("P1", 10.0), ("P2", 30.0)):
            fav = base + 5 + 3 * w  # stronger guidance -> more growth for the favouring profile
            stb = base + 5 - 1 * w
            for s in range(3):
                rows.append({"guidance_scale": w, "patient_id": pid, "scenario": FAVOURING, "sample": s,
                             "total_ml": fav + (s - 1), "baseline_total_ml": base})
                rows.append({"guidance_scale": w, "patient_id": pid, "scenario": STABLE, "sample": s,
                             "total_ml": stb, "baseline_total_ml": base})
    return pd.DataFrame(rows)


def test_guidance_separation_grows_with_scale():
    sep = guidance_separation(_sweep()).set_index("guidance_scale")
    assert sep.loc[0.0, "separation_mean"] == pytest.approx(0.0)
    assert sep.loc[2.0, "separation_mean"] == pytest.approx(8.0)  # (3 - (-1)) * 2
    assert sep.loc[2.0, "dv_favouring_mean"] == pytest.approx(11.0)  # growth vs baseline
    assert sep.loc[2.0, "dv_stable_mean"] == pytest.approx(3.0)
    assert sep.loc[2.0, "n_patients"] == 2 and sep.loc[2.0, "separation_sd"] == pytest.approx(0.0)


def test_sign_agreement():
    assert sign_agreement(2.0, 1.0) is True
    assert sign_agreement(-2.0, 1.0) is False
    assert np.isnan(sign_agreement(2.0, 0.05, tol_ml=0.1))


LAW = {"intercept": -1.9, "log_onset_h": -0.55, "anticoagulant": 0.9, "antiplatelet": 0.35, "age_per_10y": 0.0,
       "sbp_per_10mmhg": 0.10, "gcs_per_point": -0.09, "log_baseline_ml": 0.15, "noise_sd": 0.35,
       "max_relative_growth": 3.0}


def test_learned_vs_true_uses_the_law(scenarios):
    from hemexp.cohort.synth.law import expected_growth

    single, _ = scenarios
    clinical = pd.DataFrame([CLIN, {**CLIN, "patient_id": "P2", "onset_to_ct_h": 2.0, "sbp": 150.0}])
    chosen = {k: single[k] for k in (UNPERTURBED, "anticoagulant_toggled", "gcs_15")}
    rows = []
    for row in clinical.to_dict("records"):  # a "model" that learned the law exactly
        for name, scen in chosen.items():
            fu = expected_growth(apply_scenario(row, scen), LAW)["expected_followup_ml"]
            rows += [{"patient_id": row["patient_id"], "scenario": name, "sample": s, "total_ml": fu + 2.0}
                     for s in range(2)]  # + constant IVH volume cancels in ΔV
    table = learned_vs_true(pd.DataFrame(rows), clinical, chosen, LAW).set_index("scenario")
    assert table.loc["anticoagulant_toggled", "true_delta_ml_mean"] > 0  # anticoagulation -> growth
    assert table.loc["gcs_15", "true_delta_ml_mean"] < 0  # better GCS -> less growth
    assert np.allclose(table["learned_delta_ml_mean"], table["true_delta_ml_mean"])
    assert table["sign_agreement"].all() and (table["patient_sign_agreement"] == 1.0).all()

    flipped = pd.DataFrame(rows)
    flipped.loc[flipped["scenario"] == "anticoagulant_toggled", "total_ml"] -= 100.0
    t2 = learned_vs_true(flipped, clinical, chosen, LAW).set_index("scenario")
    assert not t2.loc["anticoagulant_toggled", "sign_agreement"]
    assert t2.loc["gcs_15", "sign_agreement"]


def test_learned_vs_true_profiles_against_baseline(scenarios):
    from hemexp.cohort.synth.law import expected_growth

    _, profiles = scenarios
    clinical = pd.DataFrame([CLIN])
    rows = [{"patient_id": "P1", "scenario": name, "sample": 0, "baseline_iph_ml": CLIN["baseline_iph_ml"],
             "iph_ml": expected_growth(apply_scenario(CLIN, scen), LAW)["expected_followup_ml"]}
            for name, scen in profiles.items()]
    t = learned_vs_true(pd.DataFrame(rows), clinical, profiles, LAW, reference="baseline",
                        column="iph_ml").set_index("scenario")
    assert t.loc[FAVOURING, "true_delta_ml_mean"] > t.loc[STABLE, "true_delta_ml_mean"] > 0
    assert np.allclose(t["learned_delta_ml_mean"], t["true_delta_ml_mean"])


def test_read_truth_round_trip(tmp_path):
    from hemexp.core.files import write_json
    from hemexp.evaluation.guidance.effects import read_truth

    clin = {k: v for k, v in CLIN.items() if k != "patient_id"}
    write_json(tmp_path / "truth.json", {"law": LAW, "patients": {"B002": {"split": "test", "clinical": clin},
                                                                  "A001": {"split": "train", "clinical": clin}}})
    law, table = read_truth(tmp_path / "truth.json")
    assert law == LAW
    assert table["patient_id"].tolist() == ["A001", "B002"] and table.loc[1, "split"] == "test"
    assert table.loc[0, "sbp"] == 230.0


def test_flag_conditional_law_matches_monte_carlo_and_mixes_to_the_unconditional():
    from hemexp.cohort.synth.law import (
        expansion_eta_threshold,
        expected_followup_given_flag,
        expected_growth,
        linear_predictor,
    )

    for law in (LAW, {**LAW, "intercept": -0.5, "noise_sd": 0.5, "max_relative_growth": 1.5}):
        g = expected_growth(CLIN, law)
        e1, e0 = (expected_followup_given_flag(CLIN, law, f) for f in (1, 0))
        assert g["p_expansion"] * e1 + (1 - g["p_expansion"]) * e0 == pytest.approx(g["expected_followup_ml"])
        eta = linear_predictor(CLIN, law) + np.random.default_rng(0).normal(0, law["noise_sd"], 400_000)
        fu = CLIN["baseline_iph_ml"] * (1 + np.minimum(np.exp(eta), law["max_relative_growth"]))
        grows = eta >= expansion_eta_threshold(CLIN["baseline_iph_ml"])
        assert e1 == pytest.approx(fu[grows].mean(), rel=2e-3) and e0 == pytest.approx(fu[~grows].mean(), rel=2e-3)
        assert e1 > g["expected_followup_ml"] > e0


def test_learned_vs_true_with_the_flag_held_fixed_compares_like_with_like(scenarios):
    from hemexp.cohort.synth.law import expected_followup_given_flag

    single, _ = scenarios
    clinical = pd.DataFrame([CLIN, {**CLIN, "patient_id": "P2", "onset_to_ct_h": 2.0, "sbp": 150.0}])
    chosen = {k: single[k] for k in (UNPERTURBED, "anticoagulant_toggled")}
    flags = {"P1": 1, "P2": 0}
    rows = []
    for row in clinical.to_dict("records"):  # a model that learned the flag-conditional law exactly
        f = flags[row["patient_id"]]
        for name, scen in chosen.items():
            fu = expected_followup_given_flag(apply_scenario(row, scen), LAW, f)
            rows += [{"patient_id": row["patient_id"], "scenario": name, "sample": s, "flag": f, "total_ml": fu}
                     for s in range(2)]
    like = learned_vs_true(pd.DataFrame(rows), clinical, chosen, LAW, condition_on_flag=True)
    assert np.allclose(like["learned_delta_ml_mean"], like["true_delta_ml_mean"])
    unlike = learned_vs_true(pd.DataFrame(rows), clinical, chosen, LAW)  # against the unconditional law
    assert not np.allclose(unlike["learned_delta_ml_mean"], unlike["true_delta_ml_mean"], rtol=0.05)
