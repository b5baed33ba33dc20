"""Built-in hematoma-expansion classifier: P(expansion | clinical variables, baseline volumes).

Used when ``sampling.flag_source`` is ``classifier``: samples are split p : 1−p between flag 1 and
flag 0, so what matters is a *probability* that is honest, not just a ranking.

Model: L2-regularised logistic regression on standardised features, with ``log1p`` applied to the
right-skewed volumes and onset time, and balanced class weights. Why not gradient boosting: the
training split holds tens (demo) to a few hundred (paper) patients with ~15 % expanders, so a
7-8-feature linear model is what such data support; boosting overfits at that size and its
probabilities need separate calibration. Logistic regression is also the model the HE literature
(e.g. the BAT / 9-point scores) is built on.

Features: the seven clinical variables (:data:`hemexp.core.clinical.CLINICAL_NAMES`; ``baseline_iph_ml`` is
the manifest's clinical value, the one the diffusion model is conditioned on) plus the measured
baseline IVH volume. Fitting uses the training split only; training performance is reported from
stratified cross-validated (out-of-fold) probabilities, test performance from the refit model.

The operating threshold is chosen on the out-of-fold training probabilities as the highest
threshold that reaches ``target_sensitivity`` (missing an expander is the costlier error in triage;
the paper's external classifier runs at sensitivity 1.0, specificity 0.62).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hemexp.core.clinical import CLINICAL_NAMES
from hemexp.core.errors import PatientInputError
from hemexp.core.files import atomic_path, read_json

FEATURES: tuple[str, ...] = (*CLINICAL_NAMES, "baseline_ivh_ml")
LOG_FEATURES: tuple[str, ...] = ("onset_to_ct_h", "baseline_iph_ml", "baseline_ivh_ml")


# ---------------------------------------------------------------------------- patient table
def patient_table_from_summaries(summary_paths: Sequence[str | Path], manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: clinical variables (manifest), measured baseline volumes, label, split.

    ``summary_paths`` are preprocess ``summary.json`` files (fields in docs/architecture.md);
    ``manifest`` is :func:`hemexp.cohort.manifest.read_manifest` output. Columns: ``patient_id``, ``split``,
    ``site``, the clinical variables, ``baseline_ivh_ml`` and ``measured_baseline_iph_ml`` (from the
    masks on the model grid), ``expansion`` (0/1, the paper rule on the masks) and ``he_prob``.
    """
    by_id = manifest.set_index("patient_id")
    rows = []
    for path in summary_paths:
        s = read_json(path)
        pid = s["patient_id"]
        if pid not in by_id.index:
            raise PatientInputError(pid, path, "patient of this summary is not in the manifest")
        m = by_id.loc[pid]
        vols = s["volumes_ml"]["baseline"]
        rows.append({
            "patient_id": pid, "split": s["split"], "site": s.get("site", m.get("site", "")),
            **{name: float(m[name]) for name in CLINICAL_NAMES},
            "baseline_ivh_ml": float(vols["ivh"]), "measured_baseline_iph_ml": float(vols["iph"]),
            "expansion": int(bool(s["expansion"])),
            "he_prob": float(m["he_prob"]) if "he_prob" in m and pd.notna(m["he_prob"]) else float("nan"),
        })
    return pd.DataFrame(rows).sort_values("patient_id").reset_index(drop=True)


def _features(table: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame([table]) if isinstance(table, Mapping) else table
    missing = [f for f in FEATURES if f not in frame]
    if missing:
        raise ValueError(f"classifier input lacks feature column(s) {missing}")
    return frame[list(FEATURES)].astype(float)


# ---------------------------------------------------------------------------- model
def build_pipeline(C: float = 1.0) -> Any:
    """Unfitted scikit-learn pipeline: log1p(skewed) -> standardise -> balanced logistic regression."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    other = [f for f in FEATURES if f not in LOG_FEATURES]
    prep = ColumnTransformer([("log", FunctionTransformer(np.log1p), list(LOG_FEATURES)),
                              ("raw", "passthrough", other)])
    return Pipeline([("prep", prep), ("scale", StandardScaler()),
                     ("lr", LogisticRegression(C=C, class_weight="balanced", max_iter=1000))])


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity on (y, p) is >= target (predict 1 when p >= threshold)."""
    pos = np.sort(p[y == 1])[::-1]
    if pos.size == 0:
        return 0.5
    need = int(np.ceil(target * pos.size - 1e-9))
    return float(pos[max(need, 1) - 1])


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, sensitivity and specificity at ``threshold``; undefined parts are NaN."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=int)
    pred = np.asarray(p) >= threshold
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    return {
        "auc": float(roc_auc_score(y, p)) if n_pos and n_neg else float("nan"),
        "sensitivity": float((pred & (y == 1)).sum() / n_pos) if n_pos else float("nan"),
        "specificity": float((~pred & (y == 0)).sum() / n_neg) if n_neg else float("nan"),
        "n": len(y), "n_expansion": n_pos,
    }


@dataclass
class HEClassifier:
    """A fitted expansion classifier with its operating threshold and performance report."""

    pipeline: Any
    threshold: float
    report: dict[str, Any] = field(default_factory=dict)
    features: tuple[str, ...] = FEATURES

    def predict_proba(self, patients: pd.DataFrame | Mapping[str, Any]) -> np.ndarray | float:
        """P(expansion) per row of a patient table, or a float for a single patient mapping."""
        p = self.pipeline.predict_proba(_features(patients))[:, 1]
        return float(p[0]) if isinstance(patients, Mapping) else p

    def predict_flag(self, patients: pd.DataFrame | Mapping[str, Any]) -> np.ndarray | int:
        """Binary expansion flag at the operating threshold."""
        p = self.predict_proba(patients)
        return int(p >= self.threshold) if isinstance(p, float) else (p >= self.threshold).astype(int)

    def save(self, path: str | Path) -> None:
        """joblib file (atomic). Load only files this pipeline wrote: joblib is pickle underneath."""
        import joblib

        with atomic_path(path) as tmp:
            joblib.dump({"pipeline": self.pipeline, "threshold": self.threshold, "report": self.report,
                         "features": list(self.features)}, tmp)

    @classmethod
    def load(cls, path: str | Path) -> HEClassifier:
        import joblib

        d = joblib.load(path)
        if tuple(d["features"]) != FEATURES:
            raise ValueError(f"{path}: classifier features {d['features']} differ from this code's {list(FEATURES)}")
        return cls(pipeline=d["pipeline"], threshold=float(d["threshold"]), report=d["report"])


def train_classifier(table: pd.DataFrame, C: float = 1.0, cv_folds: int = 5, target_sensitivity: float = 0.9,
                     seed: int = 0) -> HEClassifier:
    """Fit on ``split == 'train'`` rows only; report CV (train) and held-out (test) performance.

    The number of folds is capped by the minority class count of the training split (stratified
    folds need one expander each). Raises ``ValueError`` when the training split lacks a class.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    train = table[table["split"] == "train"]
    test = table[table["split"] == "test"]
    y = train["expansion"].to_numpy(int)
    counts = np.bincount(y, minlength=2)
    if counts.min() < 2:
        raise ValueError(f"training split needs >= 2 patients of each class, has {counts.tolist()} (non-exp, exp)")
    folds = int(min(cv_folds, counts.min()))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    oof = cross_val_predict(build_pipeline(C), _features(train), y, cv=cv, method="predict_proba")[:, 1]
    threshold = threshold_for_sensitivity(y, oof, target_sensitivity)
    pipeline = build_pipeline(C).fit(_features(train), y)
    report: dict[str, Any] = {
        "model": "logistic regression (log1p volumes/onset, standardised, balanced, L2)", "C": C,
        "features": list(FEATURES), "cv_folds": folds, "target_sensitivity": target_sensitivity,
        "threshold": threshold, "train_cv": operating_point(y, oof, threshold),
        "train_patients": sorted(train["patient_id"]),
    }
    if len(test):
        p_test = pipeline.predict_proba(_features(test))[:, 1]
        report["test"] = operating_point(test["expansion"].to_numpy(int), p_test, threshold)
    return HEClassifier(pipeline=pipeline, threshold=threshold, report=report)
