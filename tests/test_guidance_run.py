"""Perturbation study bookkeeping through the runner with an injected stub sampler (known effects),
the batching contract (one sampler call per guidance scale), and the trained-model glue on a tiny
random model (common random numbers, agreement with the sampling stage's own path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from hemexp.core.clinical import mask_volume_ml
from hemexp.core.config import DEFAULT_CONFIG
from hemexp.core.files import write_json
from hemexp.evaluation.guidance.effects import FAVOURING, STABLE
from hemexp.evaluation.guidance.run import (
    PROFILE,
    SINGLE,
    BundleSampler,
    PatientStudy,
    perturb_patient,
    run_study,
    study_settings,
    study_tables,
    write_study_products,
)
from hemexp.sampling.scenarios import UNPERTURBED, scenarios_from_config

SCALES = [0.0, 1.0, 2.0, 3.0]
CLIN = {"P1": {"onset_to_ct_h": 2.0, "baseline_iph_ml": 10.0, "anticoagulant": 0.0, "antiplatelet": 0.0,
               "age": 70.0, "gcs": 12.0, "sbp": 160.0},
        "P2": {"onset_to_ct_h": 5.0, "baseline_iph_ml": 20.0, "anticoagulant": 0.0, "antiplatelet": 1.0,
               "age": 80.0, "gcs": 14.0, "sbp": 180.0}}


def _cfg(results: Path | None = None) -> dict:
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    if results is not None:
        cfg["results_dir"] = str(results)
    return cfg


def _risk(c) -> float:
    """Stub model: a linear clinical score (mL at guidance scale 1)."""
    return 2.0 * c["anticoagulant"] + 1.0 * c["antiplatelet"] + 0.1 * (c["sbp"] - 150.0) \
        - 0.5 * (c["gcs"] - 10.0) - 0.2 * c["onset_to_ct_h"]


class StubSampler:
    """IPH = baseline + scale * risk + 0.7 * sample id (the 'noise', shared across settings); IVH 1 mL."""

    def __init__(self, baseline: float):
        self.baseline, self.calls = baseline, []

    def __call__(self, clinical, flags, sample_ids, scale):
        self.calls.append({"rows": len(clinical), "scale": scale, "flags": list(flags), "ids": list(sample_ids)})
        return [{"iph_ml": self.baseline + scale * _risk(c) + 0.7 * k, "ivh_ml": 1.0}
                for c, k in zip(clinical, sample_ids, strict=True)]


@pytest.fixture()
def settings():
    single, profiles = scenarios_from_config(_cfg()["evaluation"])
    return single, profiles, study_settings(single, profiles, SCALES, default_scale=1.0)


def _study(settings, n=3):
    single, profiles, sets = settings
    samplers = {pid: StubSampler(10.0) for pid in CLIN}

    def load(pid):
        return PatientStudy(pid, samplers[pid], CLIN[pid], (1,) * n, {"iph": 10.0, "ivh": 1.0, "total": 11.0})

    return run_study(sorted(CLIN), load, sets), samplers


def test_one_sampler_call_per_scale_with_every_setting_batched(settings):
    single, profiles, sets = settings
    result, samplers = _study(settings)
    calls = samplers["P1"].calls
    assert [c["scale"] for c in calls] == [1.0, 0.0, 2.0, 3.0]  # default scale first, then the sweep
    assert len(calls) == len(SCALES) and result.calls == {"P1": 4, "P2": 4}
    at_one = next(c for c in calls if c["scale"] == 1.0)
    assert at_one["rows"] == (len(single) + len(profiles)) * 3  # scenarios + profiles at the default scale
    assert at_one["ids"][:6] == [0, 1, 2, 0, 1, 2]  # sample k reuses id k in every setting
    assert all(c["rows"] == len(profiles) * 3 for c in calls if c["scale"] != 1.0)
    v = result.volumes
    assert len(v) == 2 * sum(c["rows"] for c in calls)
    assert set(v.loc[v["kind"] == SINGLE, "guidance_scale"]) == {1.0}
    assert v["total_ml"].equals(v["iph_ml"] + v["ivh_ml"])


def test_effects_are_exact_under_common_random_numbers(settings):
    result, _ = _study(settings)
    effects, separation = study_tables(result.volumes, default_scale=1.0)
    eff = effects.set_index("scenario")
    assert UNPERTURBED not in eff.index
    assert eff.loc["anticoagulant_toggled", "delta_ml_mean"] == pytest.approx(2.0)
    assert eff.loc["anticoagulant_toggled", "delta_ml_sd"] == pytest.approx(0.0)  # noise cancels per patient
    assert eff.loc["sbp_plus_30", "delta_ml_mean"] == pytest.approx(3.0)
    assert eff.loc["onset_plus_6h", "delta_ml_mean"] == pytest.approx(-1.2)
    # antiplatelet: P1 0 -> 1 (+1), P2 1 -> 0 (-1)
    assert eff.loc["antiplatelet_toggled", "delta_ml_mean"] == pytest.approx(0.0)
    assert eff.loc["antiplatelet_toggled", "delta_ml_sd"] == pytest.approx(np.sqrt(2.0))
    assert eff.loc["gcs_3", "delta_ml_mean"] == pytest.approx(np.mean([0.5 * 9, 0.5 * 11]))
    sep = separation.set_index("guidance_scale")
    assert list(sep.index) == SCALES
    assert sep.loc[0.0, "separation_mean"] == pytest.approx(0.0)
    single, profiles, _ = settings
    from hemexp.sampling.scenarios import apply_scenario

    expected = np.mean([_risk(apply_scenario(c, profiles[FAVOURING])) - _risk(apply_scenario(c, profiles[STABLE]))
                        for c in CLIN.values()])
    for w in SCALES:
        assert sep.loc[w, "separation_mean"] == pytest.approx(w * expected)


def test_products_and_learned_vs_true(tmp_path, settings):
    single, _, _ = settings
    result, _ = _study(settings)
    cfg = _cfg(tmp_path / "results")
    law = cfg["cohort"]["synthetic"]["law"]
    write_json(tmp_path / "results" / "raw" / "truth.json",
               {"law": law, "patients": {pid: {"split": "test", "clinical": c} for pid, c in CLIN.items()}})
    numbers = write_study_products(cfg, "2D-ice", result, single, default_scale=1.0)
    m = tmp_path / "results" / "metrics"
    tidy = pd.read_csv(m / "perturbation.csv")
    assert set(tidy["analysis"]) == {"perturbation", "guidance"}
    assert json.loads((m / "perturbation.json").read_text()) == pytest.approx(numbers)
    assert numbers["perturbation.anticoagulant_toggled.delta_ml_mean"] == pytest.approx(2.0)
    assert numbers["guidance.w0.separation_mean"] == pytest.approx(0.0)
    assert numbers["n_samples"] == 3 and numbers["sampler_calls"] == 8
    assert (tmp_path / "results" / "figures" / "perturbation.png").stat().st_size > 1000
    lvt = pd.read_csv(m / "learned_vs_true.csv")
    main = lvt[lvt["comparison"].str.startswith("scenario")].set_index("scenario")
    # the law: anticoagulant raises growth, a later scan lowers it; the stub agrees on both
    assert main.loc["anticoagulant_toggled", "true_delta_ml_mean"] > 0
    assert main.loc["anticoagulant_toggled", "sign_agreement"]
    assert main.loc["onset_plus_6h", "true_delta_ml_mean"] < 0 and main.loc["onset_plus_6h", "sign_agreement"]
    assert set(lvt["comparison"]) == {"scenario vs unperturbed (total)", "growth vs baseline (IPH)"}
    assert (tmp_path / "results" / "figures" / "learned_vs_true.png").stat().st_size > 1000


def test_settings_validation():
    single, profiles = scenarios_from_config(_cfg()["evaluation"])
    with pytest.raises(ValueError, match="differ"):
        study_settings(single, {**profiles, "gcs_3": profiles[STABLE]}, SCALES, 1.0)
    with pytest.raises(ValueError, match=FAVOURING):
        study_settings(single, {STABLE: profiles[STABLE]}, SCALES, 1.0)
    sets = study_settings(single, profiles, [1.0, 1.0, 2.0], 1.0)  # duplicate scales collapse
    assert sum(s.kind == PROFILE for s in sets) == 2 * len(profiles)


def test_sampler_result_count_is_checked():
    def short(clinical, flags, ids, scale):
        return [{"iph_ml": 1.0, "ivh_ml": 0.0}]

    single, profiles = scenarios_from_config(_cfg()["evaluation"])
    with pytest.raises(ValueError, match="returned 1 results"):
        perturb_patient("P1", CLIN["P1"], (1, 0), short, study_settings(single, profiles, [1.0], 1.0),
                        {"iph": 1.0, "total": 1.0})


def test_bundle_sampler_matches_the_sampling_path_and_shares_noise():
    """The glue reproduces hemexp.sampling.sampler.generate_followups volumes (as volumes.tsv measures them),
    and a row's result depends only on (clinical, flag, sample id), not on what else is batched."""
    from test_sampling import CLINICAL, synthetic_baseline, tiny_bundle

    from hemexp.core.clinical import clinical_vector
    from hemexp.sampling.products import sample_volumes
    from hemexp.sampling.sampler import SamplerSettings, generate_followups

    bundle, baseline = tiny_bundle("ice"), synthetic_baseline()
    spacing = (3.0, 3.0, 3.0)
    settings = SamplerSettings(steps=3, seed=5, chunk_size=16)
    sampler = BundleSampler(bundle, baseline, spacing, settings, 3.0, 0.5, (0, 100))
    other = {**CLINICAL, "anticoagulant": 0.0, "gcs": 3.0}
    out = sampler([CLINICAL, CLINICAL, other, other], [1, 0, 1, 0], [0, 1, 0, 1], 2.0)
    again = sampler([other, CLINICAL], [1, 0], [0, 1], 2.0)
    assert again[0] == out[2] and again[1] == out[1]
    assert sampler.calls[0]["rows"] == 4 and sampler.calls[0]["branches"] == ["cond", "null"]

    fs = generate_followups(bundle, baseline, spacing[2], clinical_vector(CLINICAL), [1, 0],
                            SamplerSettings(steps=3, seed=5, chunk_size=16, guidance_scale=2.0), 3.0, 0.5, (0, 100))
    vols = sample_volumes(fs.zs, {"ct": fs.ct_hu, "iph": fs.iph, "ivh": fs.ivh}, baseline)
    for k in range(2):
        assert out[k]["iph_ml"] == pytest.approx(mask_volume_ml(vols["iph"][k], spacing))
        assert out[k]["ivh_ml"] == pytest.approx(mask_volume_ml(vols["ivh"][k], spacing))


def test_bundle_sampler_samples_indistinguishable_rows_once():
    """Guidance 0 runs the null branch only, so clinical values cannot matter: one row per sample id;
    at guidance 1 identical scaled clinical vectors (a clamped change) are sampled once too."""
    from test_sampling import CLINICAL, synthetic_baseline, tiny_bundle

    from hemexp.sampling.sampler import SamplerSettings

    sampler = BundleSampler(tiny_bundle("ice"), synthetic_baseline(), (3.0, 3.0, 3.0),
                            SamplerSettings(steps=2, seed=1, chunk_size=16), 3.0, 0.5, (0, 100))
    other = {**CLINICAL, "gcs": 3.0, "anticoagulant": 0.0}
    out = sampler([CLINICAL, other, CLINICAL, other], [1, 1, 1, 1], [0, 0, 1, 1], 0.0)
    assert sampler.calls[-1]["rows"] == 2 and sampler.calls[-1]["requested_rows"] == 4
    assert out[0] == out[1] and out[2] == out[3]
    clamped = {**CLINICAL, "sbp": 400.0}  # clamps to 250 like sbp 250
    out = sampler([{**CLINICAL, "sbp": 250.0}, clamped, CLINICAL], [1, 1, 1], [0, 0, 0], 1.0)
    assert sampler.calls[-1]["rows"] == 2 and out[0] == out[1]
