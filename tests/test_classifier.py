"""Built-in expansion classifier: separable data, train-only fitting, persistence, patient table."""

import numpy as np
import pandas as pd
import pytest

from hemexp.core.clinical import CLINICAL_NAMES
from hemexp.core.errors import PatientInputError
from hemexp.core.files import write_json
from hemexp.sampling.classifier import (
    FEATURES,
    HEClassifier,
    patient_table_from_summaries,
    threshold_for_sensitivity,
    train_classifier,
)


def synthetic_table(n_train=60, n_test=30, seed=0):
    """Expansion driven by anticoagulation, short onset and large baseline IVH (plus noise)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    t = pd.DataFrame({
        "patient_id": [f"P{i:03d}" for i in range(n)],
        "split": ["train"] * n_train + ["test"] * n_test,
        "onset_to_ct_h": rng.uniform(0.5, 20, n), "baseline_iph_ml": rng.lognormal(2.5, 0.7, n),
        "anticoagulant": rng.integers(0, 2, n).astype(float), "antiplatelet": rng.integers(0, 2, n).astype(float),
        "age": rng.uniform(40, 90, n), "gcs": rng.integers(3, 16, n).astype(float), "sbp": rng.uniform(110, 220, n),
        "baseline_ivh_ml": rng.exponential(3.0, n),
    })
    score = 2.5 * t["anticoagulant"] - 1.2 * np.log1p(t["onset_to_ct_h"]) + 0.4 * np.log1p(t["baseline_ivh_ml"])
    t["expansion"] = (score + rng.normal(0, 0.3, n) > np.quantile(score, 0.7)).astype(int)
    return t


def test_auc_on_separable_data_and_report():
    clf = train_classifier(synthetic_table(), cv_folds=5, target_sensitivity=0.9)
    r = clf.report
    assert r["train_cv"]["auc"] > 0.8 and r["test"]["auc"] > 0.8
    assert r["train_cv"]["sensitivity"] >= 0.9  # threshold chosen on out-of-fold probabilities
    assert r["cv_folds"] == 5 and r["train_cv"]["n"] == 60 and r["test"]["n"] == 30


def test_fit_uses_training_split_only():
    t = synthetic_table()
    a = train_classifier(t)
    scrambled = t.copy()
    test = scrambled["split"] == "test"
    scrambled.loc[test, "expansion"] = 1 - scrambled.loc[test, "expansion"]
    scrambled.loc[test, "baseline_ivh_ml"] *= 50
    b = train_classifier(scrambled)
    coef_a = a.pipeline.named_steps["lr"].coef_
    assert np.allclose(coef_a, b.pipeline.named_steps["lr"].coef_)
    assert a.threshold == b.threshold
    assert b.report["test"]["auc"] < 0.2  # the flipped test labels are now predicted backwards
    assert set(a.report["train_patients"]) == set(t.loc[t["split"] == "train", "patient_id"])


def test_predict_proba_forms_and_persistence(tmp_path):
    t = synthetic_table()
    clf = train_classifier(t)
    one = t.iloc[0][list(FEATURES)].to_dict()
    p = clf.predict_proba(one)
    assert isinstance(p, float) and 0.0 <= p <= 1.0
    assert clf.predict_flag(one) == int(p >= clf.threshold)
    clf.save(tmp_path / "clf.joblib")
    back = HEClassifier.load(tmp_path / "clf.joblib")
    assert np.allclose(back.predict_proba(t), clf.predict_proba(t))
    assert back.threshold == clf.threshold and back.report == clf.report
    with pytest.raises(ValueError, match="feature"):
        clf.predict_proba({k: v for k, v in one.items() if k != "gcs"})


def test_training_split_needs_both_classes():
    t = synthetic_table()
    t.loc[t["split"] == "train", "expansion"] = 0
    with pytest.raises(ValueError, match="each class"):
        train_classifier(t)


def test_threshold_for_sensitivity():
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.5, 0.1])
    assert threshold_for_sensitivity(y, p, 0.5) == 0.8
    assert threshold_for_sensitivity(y, p, 0.75) == 0.3
    assert threshold_for_sensitivity(y, p, 1.0) == 0.2


def test_patient_table_from_summaries(tmp_path):
    manifest = pd.DataFrame([
        {"patient_id": pid, "site": "A", "split": "train", **{c: 1.0 for c in CLINICAL_NAMES}, "he_prob": np.nan}
        for pid in ("A001", "A002")
    ])
    paths = []
    for pid, exp in (("A002", True), ("A001", False)):
        path = tmp_path / pid / "summary.json"
        write_json(path, {"patient_id": pid, "split": "train", "site": "A", "expansion": exp,
                          "volumes_ml": {"baseline": {"iph": 12.5, "ivh": 3.0, "total": 15.5},
                                         "followup": {"iph": 20.0, "ivh": 3.0, "total": 23.0}}})
        paths.append(path)
    t = patient_table_from_summaries(paths, manifest)
    assert t["patient_id"].tolist() == ["A001", "A002"]
    assert t["expansion"].tolist() == [0, 1]
    assert t.loc[0, "baseline_ivh_ml"] == 3.0 and t.loc[0, "measured_baseline_iph_ml"] == 12.5
    assert set(FEATURES) <= set(t.columns)
    write_json(tmp_path / "x.json", {"patient_id": "Z999", "split": "train", "expansion": False,
                                     "volumes_ml": {"baseline": {"iph": 1, "ivh": 0}}})
    with pytest.raises(PatientInputError, match="Z999"):
        patient_table_from_summaries([tmp_path / "x.json"], manifest)
