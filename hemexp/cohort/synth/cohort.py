"""Simulate the synthetic ground-truth cohort end to end and write it as the workflow expects.

Three passes, so the expander fraction can be checked (and, if needed, met) per split before any
follow-up is drawn: (1) per patient: clinical values, anatomy, clot, baseline scan, measured
baseline volume; (2) per split: the patient noise of the growth law, with the fewest deterministic
nudges needed to keep every split within ``expander_fraction`` (:func:`hemexp.cohort.synth.law.calibrate_noise`);
(3) per patient: follow-up scan with the clot grown to the law's volume. Labels are then computed
from the *written* masks with the paper's rule and checked once more; the manifest is written last,
so a violated check leaves no manifest behind and the ``synth`` rule fails.

Every random draw comes from a stream keyed by (cohort seed, patient, purpose), so a patient's
images do not depend on which other patients exist (except through the rare noise nudge).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from hemexp.cohort.manifest import REQUIRED_COLUMNS, SPLITS, write_manifest
from hemexp.cohort.patients import synthetic_inputs, synthetic_patient_ids
from hemexp.cohort.synth.anatomy import COMPARTMENTS, Anatomy, draw_anatomy
from hemexp.cohort.synth.clinical import draw_baseline_target_ml, draw_clinical
from hemexp.cohort.synth.dicom_writer import write_dicom_series
from hemexp.cohort.synth.fields import patient_rng
from hemexp.cohort.synth.law import (
    allowed_expander_counts,
    calibrate_noise,
    expected_growth,
    linear_predictor,
    realised_growth,
)
from hemexp.cohort.synth.lesion import Lesion, displace, draw_lesion, followup_field
from hemexp.cohort.synth.scan import Blood, Rendered, ScanGeometry, draw_geometry, render_scan
from hemexp.core.clinical import CLINICAL_NAMES, is_expansion, mask_volume_ml
from hemexp.core.config import ConfigError, validate_config
from hemexp.core.files import atomic_path, write_json
from hemexp.core.layout import Layout, raw_dir

log = logging.getLogger(__name__)
LABEL_MARGIN = 0.02  # eta distance kept from the expansion threshold (voxel rounding cannot flip a label)
TIMEPOINTS = ("baseline", "followup")


class CohortCheckError(RuntimeError):
    """The realised synthetic cohort violates a configured property (e.g. the expander fraction)."""


@dataclass
class PatientSim:
    """State of one simulated patient carried between the passes (no image arrays)."""

    patient_id: str
    site: str
    split: str
    clinical: dict[str, float]
    anatomy: Anatomy
    lesion: Lesion
    volumes: dict[str, dict[str, float]] = field(default_factory=dict)
    scans: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline_level: float = 0.0
    baseline_fill: dict[int, float] = field(default_factory=dict)
    noise_raw: float = 0.0
    noise: float = 0.0
    noise_adjusted: bool = False
    realised: dict[str, float] = field(default_factory=dict)


def synthesize(cfg: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Simulate and write the cohort under ``raw_dir(cfg)``; returns the truth document.

    The config is validated first (:func:`hemexp.core.config.validate_config` holds the cohort's
    cross-key rules: test sites among the sites, a training site left, ranges [low, high]). That
    ``n_patients`` is the sum of the sites is checked here only: it matters only to synthesis, and
    small test cohorts (below the schema's minimum ``n_patients``) run the other stages.
    """
    validate_config(cfg, source="cohort.synthetic")
    syn = cfg["cohort"]["synthetic"]
    if syn["n_patients"] != sum(syn["sites"].values()):
        raise ConfigError([f"cohort.synthetic.n_patients ({syn['n_patients']}) != sum of cohort.synthetic.sites "
                           f"({sum(syn['sites'].values())})"], "cohort.synthetic")
    out = raw_dir(cfg)
    ids = synthetic_patient_ids(cfg)
    t0 = time.perf_counter()
    sims = [_baseline(cfg, pid, site, split) for pid, site, split in tqdm(ids, desc="synth baseline", disable=not progress)]
    _calibrate(sims, syn)
    for sim in tqdm(sims, desc="synth follow-up", disable=not progress):
        _followup(cfg, sim)
    truth = _truth(syn, sims, time.perf_counter() - t0)
    check_cohort(truth, syn["expander_fraction"])
    layout = Layout.of(cfg)
    write_json(layout.truth, truth)
    _write_table(layout.synthetic_clinical, _clinical_table(sims))
    write_manifest(_manifest(cfg, sims), layout.synthetic_manifest)
    log.info("synthetic cohort: %d patients in %.1f s under %s", len(sims), time.perf_counter() - t0, out)
    return truth


def _geometry(syn: dict[str, Any], sim_anat: Anatomy, pid: str, tp: str) -> ScanGeometry:
    rng = patient_rng(syn["seed"], pid, f"{tp}_scan")
    return draw_geometry(rng, sim_anat, syn["matrix"], syn["inplane_mm"], tuple(syn["slice_thickness_mm"]))


def _baseline(cfg: dict[str, Any], pid: str, site: str, split: str) -> PatientSim:
    syn = cfg["cohort"]["synthetic"]
    seed, law = syn["seed"], syn["law"]
    rng = patient_rng(seed, pid, "clinical")
    target = draw_baseline_target_ml(rng)
    clinical = draw_clinical(rng, target)
    anat = draw_anatomy(patient_rng(seed, pid, "anatomy"), clinical["age"])
    lesion = draw_lesion(patient_rng(seed, pid, "lesion"), anat, target, law["max_relative_growth"])
    geom = _geometry(syn, anat, pid, "baseline")
    blood = Blood(lesion, lesion.baseline_field, target, target, edema_mm=1.5, edema_hu=2.0)
    rendered = render_scan(anat, geom, blood, patient_rng(seed, pid, "baseline_noise"))
    sim = PatientSim(pid, site, split, clinical, anat, lesion)
    _record(cfg, sim, "baseline", geom, rendered, target)
    sim.clinical["baseline_iph_ml"] = sim.volumes["baseline"]["iph"]
    sim.baseline_level, sim.baseline_fill = rendered.level, rendered.fill
    sim.noise_raw = sim.noise = float(patient_rng(seed, pid, "law").normal(0.0, law["noise_sd"]))
    return sim


def _calibrate(sims: list[PatientSim], syn: dict[str, Any]) -> None:
    law = syn["law"]
    for split in SPLITS:
        group = [s for s in sims if s.split == split]
        if not group:
            continue
        mu = [linear_predictor(s.clinical, law) for s in group]
        fraction = syn["expander_fraction"] if syn["calibrate_noise"] else (0.0, 1.0)
        noises, adjusted = calibrate_noise(mu, [s.noise_raw for s in group],
                                           [s.clinical["baseline_iph_ml"] for s in group], fraction, LABEL_MARGIN)
        for s, n, a in zip(group, noises, adjusted, strict=True):
            s.noise, s.noise_adjusted = n, a
            if a:
                log.info("patient %s: law noise nudged %.3f -> %.3f (split %s)", s.patient_id, s.noise_raw, n, split)


def _followup(cfg: dict[str, Any], sim: PatientSim) -> None:
    syn = cfg["cohort"]["synthetic"]
    sim.realised = realised_growth(sim.clinical, syn["law"], sim.noise)
    target = sim.realised["followup_ml"]
    geom = _geometry(syn, sim.anatomy, sim.patient_id, "followup")
    blood = Blood(sim.lesion, followup_field(sim.lesion, sim.baseline_level), target, target,
                  previous_fill=sim.baseline_fill, edema_mm=3.5, edema_hu=5.0)
    rendered = render_scan(sim.anatomy, geom, blood, patient_rng(syn["seed"], sim.patient_id, "followup_noise"))
    _record(cfg, sim, "followup", geom, rendered, target)


def _record(cfg: dict[str, Any], sim: PatientSim, tp: str, geom: ScanGeometry, r: Rendered, mass_ml: float) -> None:
    """Write one timepoint's images and remember its measured volumes and acquisition facts."""
    spacing = (geom.inplane_mm, geom.inplane_mm, geom.thickness_mm)
    sim.volumes[tp] = {"iph": round(mask_volume_ml(r.iph, spacing), 6), "ivh": round(mask_volume_ml(r.ivh, spacing), 6)}
    if abs(sim.volumes[tp]["iph"] - mass_ml) > geom.voxel_ml:  # the clot ran out of room (brain edge)
        log.warning("patient %s %s: IPH %.2f mL realised instead of %.2f mL", sim.patient_id, tp,
                    sim.volumes[tp]["iph"], mass_ml)
    midline = displace(tuple(np.array([v], np.float32) for v in (0.0, *sim.lesion.centre[1:])),  # type: ignore[arg-type]
                       sim.lesion.centre, mass_ml, sim.anatomy)
    sim.scans[tp] = {
        "slice_thickness_mm": geom.thickness_mm, "n_slices": geom.n_slices, "pose_deg": list(geom.pose_deg),
        "translation_mm": [round(float(v), 3) for v in geom.translation], "brain_ml": round(r.info["brain_ml"], 3),
        "midline_shift_mm": round(abs(float(midline[0][0])), 3),
        "ivh_fill": {COMPARTMENTS[c]: round(f, 4) for c, f in sorted(r.fill.items())},
    }
    write_timepoint(cfg, sim.patient_id, tp, geom.affine, r)


def write_timepoint(cfg: dict[str, Any], pid: str, tp: str, affine: np.ndarray, r: Rendered) -> None:
    """CT (DICOM series and/or NIfTI) and IPH/IVH masks of one timepoint, each written atomically."""
    syn = cfg["cohort"]["synthetic"]
    paths = synthetic_inputs(cfg, pid)
    base = raw_dir(cfg) / pid
    if "dicom" in syn["formats"]:
        write_dicom_series(r.hu, affine, base / f"{tp}_ct", pid, f"{tp} head CT",
                           series_number=1 if tp == "baseline" else 2, uid_seed=f"{syn['seed']}/{pid}/{tp}")
    if "nifti" in syn["formats"]:
        save_nifti(r.hu.astype(np.int16), affine, base / f"{tp}_ct.nii.gz")  # integer HU, as converters write
    save_nifti(r.iph, affine, paths[f"{tp}_iph"])
    save_nifti(r.ivh, affine, paths[f"{tp}_ivh"])


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _truth(syn: dict[str, Any], sims: list[PatientSim], seconds: float) -> dict[str, Any]:
    law = syn["law"]
    patients = {}
    for s in sims:
        v0, v1 = s.volumes["baseline"]["iph"], s.volumes["followup"]["iph"]
        patients[s.patient_id] = {
            "site": s.site, "split": s.split, "clinical": dict(s.clinical), "lesion": s.lesion.describe(),
            "volumes_ml": s.volumes, "expected": expected_growth(s.clinical, law),
            "realised": {**s.realised, "noise": s.noise, "noise_raw": s.noise_raw, "noise_adjusted": s.noise_adjusted,
                         "target_followup_ml": s.realised["followup_ml"], "measured_growth_ml": round(v1 - v0, 6)},
            "ivh": {tp: s.volumes[tp]["ivh"] > 0 for tp in TIMEPOINTS},
            "expansion": is_expansion(v0, v1), "scans": s.scans,
        }
    return {"seed": syn["seed"], "law": dict(law), "expander_fraction": list(syn["expander_fraction"]),
            "splits": _split_summary(patients), "seconds": round(seconds, 2), "patients": patients}


def _split_summary(patients: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for split in SPLITS:
        labels = [p["expansion"] for p in patients.values() if p["split"] == split]
        if labels:
            out[split] = {"n": len(labels), "expanders": int(sum(labels)), "fraction": sum(labels) / len(labels)}
    return out


def check_cohort(truth: dict[str, Any], fraction: list[float]) -> None:
    """Raise :class:`CohortCheckError` if a split's expander count is outside the configured range
    or a measured label disagrees with the law's realised growth."""
    problems = []
    for split, s in truth["splits"].items():
        lo, hi = allowed_expander_counts(s["n"], fraction)
        if not lo <= s["expanders"] <= hi:
            problems.append(f"split {split}: {s['expanders']} of {s['n']} expanders, allowed {lo}-{hi} "
                            f"(expander_fraction {fraction})")
    for pid, p in truth["patients"].items():
        if p["expansion"] != p["realised"]["expansion"]:
            problems.append(f"patient {pid}: label from the written masks ({p['expansion']}) differs from the "
                            f"law's realised growth ({p['realised']['expansion']})")
    if problems:
        raise CohortCheckError("synthetic cohort check failed:\n  - " + "\n  - ".join(problems))


def _clinical_table(sims: list[PatientSim]) -> pd.DataFrame:
    rows = [{"patient_id": s.patient_id, "site": s.site, "split": s.split, **{k: s.clinical[k] for k in CLINICAL_NAMES}}
            for s in sims]
    return pd.DataFrame(rows)


def _manifest(cfg: dict[str, Any], sims: list[PatientSim]) -> pd.DataFrame:
    base = raw_dir(cfg)
    rows = []
    for s in sims:
        paths = {k: str(Path(v).relative_to(base)) for k, v in synthetic_inputs(cfg, s.patient_id).items()}
        expansion = is_expansion(s.volumes["baseline"]["iph"], s.volumes["followup"]["iph"])
        rows.append({"patient_id": s.patient_id, "site": s.site, "split": s.split, **paths,
                     **{k: s.clinical[k] for k in CLINICAL_NAMES}, "expansion": int(expansion)})
    return pd.DataFrame(rows, columns=[*REQUIRED_COLUMNS, "expansion"])


def _write_table(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)
