"""Clinical perturbation scenarios and their bookkeeping (paper Fig. 3).

Scenarios are data (``evaluation.scenarios`` and ``evaluation.profiles`` in the config): each maps
clinical variables to one operation — ``{add: x}``, ``{set: x}`` or ``toggle`` (binary 0 <-> 1).
:func:`apply_scenario` applies one to a patient's clinical row and clamps the result to the model's
input ranges (:data:`hemexp.core.clinical.CLINICAL_VARIABLES`), exactly the ranges the conditioning MLP
sees, so "+6 h" on a 20 h patient becomes 24 h rather than an out-of-range input.

Bookkeeping works on a long table of generated volumes, one row per (patient, scenario, sample)
with ``patient_id``, ``scenario``, ``sample``, ``total_ml`` and optionally ``guidance_scale`` and
``baseline_total_ml``. Effects are computed per patient first (mean over that patient's samples),
then averaged over patients, so every patient weighs the same whatever its sample count. Every
function takes ``column`` (default ``total_ml``; the baseline column is ``baseline_<column>``) so
the same bookkeeping serves IPH-only volumes, e.g. ``column="iph_ml"`` with ``baseline_iph_ml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hemexp.cohort.synth.law import expected_followup_given_flag, expected_growth
from hemexp.core.clinical import CLINICAL_BY_NAME
from hemexp.core.files import read_json
from hemexp.sampling.scenarios import UNPERTURBED, Scenario, apply_scenario

FAVOURING = "expansion_favouring"
STABLE = "stable"


# ---------------------------------------------------------------------------- bookkeeping
def _patient_means(volumes: pd.DataFrame, keys: Sequence[str], column: str) -> pd.DataFrame:
    return volumes.groupby([*keys, "patient_id"], sort=False)[column].mean().rename("mean_ml").reset_index()


def _summarise(per_patient: pd.DataFrame, keys: Sequence[str], col: str) -> pd.DataFrame:
    g = per_patient.groupby(list(keys), sort=False)[col]
    return pd.DataFrame({"n_patients": g.count(), f"{col}_mean": g.mean(),
                         f"{col}_sd": g.std(ddof=1)}).reset_index()


def patient_deltas(volumes: pd.DataFrame, reference: str = UNPERTURBED, column: str = "total_ml") -> pd.DataFrame:
    """Per patient and scenario: ΔV = mean sample volume − reference (mL).

    ``reference`` is a scenario name (compared within the same guidance scale when the table has a
    ``guidance_scale`` column) or ``"baseline"`` (the patient's ``baseline_<column>``: ΔV is then the
    predicted growth). Patients lacking the reference are dropped, never compared with another
    patient's reference.
    """
    scale = ["guidance_scale"] if "guidance_scale" in volumes else []
    means = _patient_means(volumes, [*scale, "scenario"], column)
    if reference == "baseline":
        base = volumes.groupby("patient_id")[f"baseline_{column}"].first().rename("ref_ml").reset_index()
        merged = means.merge(base, on="patient_id", how="inner")
    else:
        ref = means[means["scenario"] == reference].drop(columns="scenario").rename(columns={"mean_ml": "ref_ml"})
        if ref.empty:
            raise ValueError(f"reference scenario {reference!r} not in the volume table")
        merged = means.merge(ref, on=[*scale, "patient_id"], how="inner")
    merged["delta_ml"] = merged["mean_ml"] - merged["ref_ml"]
    return merged


def perturbation_effects(volumes: pd.DataFrame, reference: str = UNPERTURBED, column: str = "total_ml") -> pd.DataFrame:
    """Mean and sd over patients of ΔV per scenario (and guidance scale), reference row excluded.

    Columns: [``guidance_scale``,] ``scenario``, ``n_patients``, ``delta_ml_mean``, ``delta_ml_sd``.
    """
    deltas = patient_deltas(volumes, reference, column)
    deltas = deltas[deltas["scenario"] != reference]
    keys = (["guidance_scale"] if "guidance_scale" in deltas else []) + ["scenario"]
    return _summarise(deltas, keys, "delta_ml")


def guidance_separation(volumes: pd.DataFrame, favouring: str = FAVOURING, stable: str = STABLE,
                        reference: str = "baseline", column: str = "total_ml") -> pd.DataFrame:
    """Per guidance scale: ΔV of each profile and the separation ΔV(favouring) − ΔV(stable).

    The separation is formed per patient (same baseline, same scale) and then averaged, so it does not
    depend on ``reference`` except through which patients have one. Columns: ``guidance_scale``,
    ``n_patients``, ``dv_favouring_mean``/``_sd``, ``dv_stable_mean``/``_sd``, ``separation_mean``/``_sd``.
    """
    deltas = patient_deltas(volumes[volumes["scenario"].isin([favouring, stable])], reference, column)
    wide = deltas.pivot_table(index=["guidance_scale", "patient_id"], columns="scenario", values="delta_ml")
    wide = wide.dropna(subset=[favouring, stable]).reset_index()
    wide = wide.rename(columns={favouring: "dv_favouring", stable: "dv_stable"})
    wide["separation"] = wide["dv_favouring"] - wide["dv_stable"]
    out = _summarise(wide, ["guidance_scale"], "dv_favouring")
    for col in ("dv_stable", "separation"):
        out = out.merge(_summarise(wide, ["guidance_scale"], col).drop(columns="n_patients"), on="guidance_scale")
    return out.sort_values("guidance_scale").reset_index(drop=True)


def sign_agreement(learned: float, true: float, tol_ml: float = 0.0) -> bool | float:
    """Whether two effects have the same sign; NaN when the true effect is within ``tol_ml`` of zero."""
    if not np.isfinite(learned) or not np.isfinite(true) or abs(true) <= tol_ml:
        return float("nan")
    return bool(np.sign(learned) == np.sign(true))


# ---------------------------------------------------------------------------- learned vs true
def read_truth(path: str | Path) -> tuple[dict[str, float], pd.DataFrame]:
    """(growth-law parameters, one clinical row per patient) from ``results/raw/truth.json``.

    ``hemexp synth`` writes the law it simulated under ``law`` and each patient's clinical values
    under ``patients.<id>.clinical``; reading both from the same file guarantees the comparison uses
    the law the cohort was actually drawn from, not the current config.
    """

    truth = read_json(path)
    rows = [{"patient_id": pid, "split": p.get("split", ""), **{k: float(p["clinical"][k]) for k in CLINICAL_BY_NAME}}
            for pid, p in sorted(truth["patients"].items())]
    return dict(truth["law"]), pd.DataFrame(rows)


def _expected_followup(row: Mapping[str, float], law: Mapping[str, float], flag_share: float | None) -> float:
    """The law's expected follow-up IPH: unconditional, or mixed over the flags the samples were given."""
    if flag_share is None:
        return expected_growth(row, law)["expected_followup_ml"]
    return (flag_share * expected_followup_given_flag(row, law, 1)
            + (1.0 - flag_share) * expected_followup_given_flag(row, law, 0))


def true_patient_deltas(clinical: pd.DataFrame, scenarios: Mapping[str, Scenario], law: Mapping[str, float],
                        reference: str = UNPERTURBED,
                        flag_share: Mapping[tuple[str, str], float] | None = None) -> pd.DataFrame:
    """Ground-truth ΔV per patient and scenario from the synthetic cohort's growth law.

    ``clinical`` has one row per patient (``patient_id`` + the seven clinical columns). The truth is the
    law's conditional expectation (:func:`hemexp.cohort.synth.law.expected_growth`) of the follow-up IPH
    volume under the scenario's clinical values minus the same under the reference (``"baseline"``:
    minus the baseline volume, i.e. the expected growth). The law moves IPH only, so this is also the
    true change of total hemorrhage (IVH is unaffected by the clinical variables).

    ``flag_share`` ((patient, scenario) -> share of those samples generated with flag 1; a classifier's
    flags may differ between scenarios) compares like with like for
    a flag-conditioned model: the truth is then the law's expectation *given* those flags
    (:func:`hemexp.cohort.synth.law.expected_followup_given_flag`, mixed in the same proportion), because
    with the flag held fixed a clinical change can only move growth within the flag's side of the
    expansion threshold. Without it, the unconditional expectation.
    """

    records = []
    for row in clinical.to_dict("records"):
        pid = row["patient_id"]
        if flag_share is not None and not any((pid, name) in flag_share for name in scenarios):
            continue  # no samples of this patient: nothing to compare
        share = {name: None if flag_share is None else flag_share.get((pid, name), 0.0) for name in scenarios}
        if reference == "baseline":
            ref_ml = float(row["baseline_iph_ml"])
        else:
            ref_ml = _expected_followup(apply_scenario(row, scenarios[reference]), law, share[reference])
        for name, scenario in scenarios.items():
            if name == reference:
                continue
            fu = _expected_followup(apply_scenario(row, scenario), law, share[name])
            records.append({"patient_id": row["patient_id"], "scenario": name, "true_delta_ml": fu - ref_ml})
    return pd.DataFrame(records, columns=["patient_id", "scenario", "true_delta_ml"])


def learned_vs_true(volumes: pd.DataFrame, clinical: pd.DataFrame, scenarios: Mapping[str, Scenario],
                    law: Mapping[str, float], reference: str = UNPERTURBED, tol_ml: float = 0.0,
                    column: str = "total_ml", condition_on_flag: bool = False) -> pd.DataFrame:
    """Compare each learned scenario effect with the ground-truth law, on the same patients.

    ``volumes`` is the generated-volume table of :func:`patient_deltas` (one guidance scale: filter it
    first). With ``reference="baseline"`` the truth is the expected IPH *growth*, so pass IPH volumes
    (``column="iph_ml"`` with ``baseline_iph_ml``): total volumes would add any IVH change the law does
    not model. Returns one row per scenario: ``n_patients``, learned and true ΔV mean/sd (mL),
    ``sign_agreement`` of the two means (NaN when |true mean| <= ``tol_ml``) and
    ``patient_sign_agreement`` (share of patients whose learned ΔV has the true ΔV's sign).
    ``condition_on_flag`` (for a flag-conditioned variant) takes the truth given each patient's sample
    flags (the ``flag`` column), see :func:`true_patient_deltas`.
    """
    if "guidance_scale" in volumes and volumes["guidance_scale"].nunique() > 1:
        raise ValueError("learned_vs_true needs volumes from a single guidance scale")
    learned = patient_deltas(volumes.drop(columns="guidance_scale", errors="ignore"), reference, column)
    learned = learned[learned["scenario"] != reference][["patient_id", "scenario", "delta_ml"]]
    shares = volumes.groupby(["patient_id", "scenario"])["flag"].mean().to_dict() if condition_on_flag else None
    truth = true_patient_deltas(clinical, {k: v for k, v in scenarios.items() if k in set(learned["scenario"])
                                           or k == reference}, law, reference, flag_share=shares)
    both = learned.merge(truth, on=["patient_id", "scenario"], how="inner")
    rows = []
    for name, grp in both.groupby("scenario", sort=False):
        lm, tm = float(grp["delta_ml"].mean()), float(grp["true_delta_ml"].mean())
        agree = [sign_agreement(a, b, tol_ml) for a, b in zip(grp["delta_ml"], grp["true_delta_ml"], strict=True)]
        defined = [a for a in agree if not isinstance(a, float)]
        rows.append({
            "scenario": name, "n_patients": len(grp),
            "learned_delta_ml_mean": lm, "learned_delta_ml_sd": float(grp["delta_ml"].std(ddof=1)),
            "true_delta_ml_mean": tm, "true_delta_ml_sd": float(grp["true_delta_ml"].std(ddof=1)),
            "sign_agreement": sign_agreement(lm, tm, tol_ml),
            "patient_sign_agreement": float(np.mean(defined)) if defined else float("nan"),
        })
    return pd.DataFrame(rows)
