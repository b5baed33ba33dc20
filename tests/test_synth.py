"""Synthetic ground-truth cohort (hemexp synth): growth law, phantom, lesion, determinism, outputs."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from hemexp.cli import main
from hemexp.cohort.manifest import read_manifest
from hemexp.cohort.synth import anatomy as A
from hemexp.cohort.synth import law as L
from hemexp.cohort.synth.cohort import CohortCheckError, check_cohort, synthesize
from hemexp.cohort.synth.fields import Ellipsoid, LocalGrid, patient_rng, random_rotation
from hemexp.cohort.synth.lesion import compress_ventricles, displace, draw_lesion, followup_field
from hemexp.cohort.synth.scan import Blood, draw_geometry, rasterize, render_scan
from hemexp.core.clinical import CLINICAL_NAMES, is_expansion, mask_volume_ml
from hemexp.core.config import load_config

DEFAULT_LAW = load_config(None)["cohort"]["synthetic"]["law"]
REFERENCE = {"onset_to_ct_h": 2.0, "baseline_iph_ml": 12.0, "anticoagulant": 0.0, "antiplatelet": 0.0,
             "age": 70.0, "gcs": 13.0, "sbp": 170.0}
RAISED = {"onset_to_ct_h": 6.0, "baseline_iph_ml": 30.0, "anticoagulant": 1.0, "antiplatelet": 1.0,
          "age": 85.0, "gcs": 15.0, "sbp": 210.0}  # each value larger than in REFERENCE


# --- growth law ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("coef", list(L.COEFFICIENT_VARIABLE))
def test_each_variable_moves_expected_growth_with_its_coefficient(coef: str, sign: float) -> None:
    """Raising one clinical variable moves E[log growth] and P(expansion) in the sign of its coefficient
    (checked for the config's sign and the flipped sign, so the direction comes from the config)."""
    law = {**DEFAULT_LAW, coef: sign * abs(DEFAULT_LAW[coef]) or sign * 0.1}
    var = L.COEFFICIENT_VARIABLE[coef]
    lo = L.expected_growth(REFERENCE, law)
    hi = L.expected_growth({**REFERENCE, var: RAISED[var]}, law)
    direction = np.sign(law[coef])
    assert np.sign(hi["expected_log_relative_growth"] - lo["expected_log_relative_growth"]) == direction
    assert np.sign(hi["expected_relative_growth"] - lo["expected_relative_growth"]) == direction
    if var != "baseline_iph_ml":  # the expansion threshold itself depends on the baseline volume
        assert np.sign(hi["p_expansion"] - lo["p_expansion"]) == direction
        assert np.sign(hi["expected_growth_ml"] - lo["expected_growth_ml"]) == direction


def test_default_law_matches_clinical_knowledge() -> None:
    """Shorter onset, anticoagulant, antiplatelet, higher SBP, lower GCS -> more expected growth."""
    base = L.expected_growth(REFERENCE, DEFAULT_LAW)["expected_growth_ml"]
    more = [{"onset_to_ct_h": 0.5}, {"anticoagulant": 1.0}, {"antiplatelet": 1.0}, {"sbp": 200.0}, {"gcs": 7.0}]
    for change in more:
        assert L.expected_growth({**REFERENCE, **change}, DEFAULT_LAW)["expected_growth_ml"] > base, change


def test_expectations_match_monte_carlo() -> None:
    """The closed-form capped-lognormal mean and the expansion probability equal simulated ones."""
    law = {**DEFAULT_LAW, "max_relative_growth": 0.6}  # a cap that binds often
    clinical = {**REFERENCE, "anticoagulant": 1.0, "onset_to_ct_h": 0.5}
    exp = L.expected_growth(clinical, law)
    noise = np.random.default_rng(0).normal(0.0, law["noise_sd"], 100_000)
    real = [L.realised_growth(clinical, law, e) for e in noise[:20_000]]
    r = np.minimum(np.exp(exp["expected_log_relative_growth"] + noise), law["max_relative_growth"])
    assert exp["expected_relative_growth"] == pytest.approx(r.mean(), rel=0.01)
    assert exp["p_expansion"] == pytest.approx(np.mean([x["expansion"] for x in real]), abs=0.015)
    fu = np.array([x["followup_ml"] for x in real])
    assert np.all(fu >= clinical["baseline_iph_ml"]) and fu.max() <= clinical["baseline_iph_ml"] * 1.6 + 1e-9


def test_realised_expansion_follows_the_paper_rule() -> None:
    for v0 in (3.0, 12.0, 40.0):
        for noise in np.linspace(-2, 2, 41):
            g = L.realised_growth({**REFERENCE, "baseline_iph_ml": v0}, DEFAULT_LAW, noise)
            assert g["expansion"] == is_expansion(v0, g["followup_ml"])


def test_calibrate_noise_makes_the_fewest_smallest_changes() -> None:
    mu, v0 = [-2.0] * 6, [10.0] * 6  # threshold eta = log(0.33) = -1.109
    noise = [1.5, 1.2, 0.95, 0.2, 0.0, -0.5]  # 3 expanders (gaps 0.609, 0.309, 0.059)
    new, adjusted = L.calibrate_noise(mu, noise, v0, (0.15, 0.2), margin=0.02)  # allows exactly 1
    assert adjusted == [False, True, True, False, False, False]  # the two closest to the threshold
    labels = [m + e >= L.expansion_eta_threshold(v) for m, e, v in zip(mu, new, v0, strict=True)]
    assert sum(labels) == 1 and labels[0]
    assert new[1] == pytest.approx(math.log(0.33) + 2.0 - 0.02)
    same, adj = L.calibrate_noise(mu, noise, v0, (0.0, 1.0), margin=0.02)
    assert same == noise and not any(adj)
    with pytest.raises(ValueError, match="no whole number of expanders"):
        L.allowed_expander_counts(6, (0.2, 0.3))


# --- phantom and lesion ----------------------------------------------------------------------------

def test_intracranial_volume_is_realistic() -> None:
    vols = [A.draw_anatomy(patient_rng(5, f"P{i}", "anatomy"), age).intracranial_ml()
            for i, age in enumerate(np.linspace(40, 95, 12))]
    assert all(1000.0 <= v <= 1600.0 for v in vols), vols
    assert np.std(vols) > 30.0  # heads differ between patients


def test_older_patients_have_larger_ventricles() -> None:
    def ventricle_ml(age: float) -> float:
        anat = A.draw_anatomy(patient_rng(3, "P1", "anatomy"), age)
        g = np.arange(-60, 60, 2.0, dtype=np.float32)
        pts = np.meshgrid(g, g, g, indexing="ij")
        return float(np.count_nonzero(A.evaluate(anat, pts).label == A.VENTRICLE)) * 8e-3

    assert ventricle_ml(90.0) > 1.2 * ventricle_ml(45.0)


def test_rasterized_ellipsoid_volume_matches_analytic() -> None:
    """A rotated ellipsoid sampled at slice centres of thick, posed scans has volume 4/3 pi abc."""
    rng = np.random.default_rng(2)
    anat = A.draw_anatomy(rng, 70.0)
    ell = Ellipsoid(centre=np.array([12.0, -5.0, 20.0]), axes=np.array([14.0, 20.0, 11.0]),
                    rotation=random_rotation(rng))
    grid = LocalGrid.around(ell.centre, 25.0, 1.0)
    values = 1.0 - ell.q(grid.points())
    for thickness in (1.0, 2.5, 5.0):
        geom = draw_geometry(rng, anat, 112, 2.0, (thickness, thickness))
        mask = rasterize(geom, grid, values, 0.0)
        vol = mask_volume_ml(mask, (2.0, 2.0, thickness))
        assert vol == pytest.approx(ell.volume_ml, rel=0.04), (thickness, vol, ell.volume_ml)


def _patient(location: str, target: float, seed: int = 4):
    anat = A.draw_anatomy(patient_rng(seed, "T1", "anatomy"), 75.0)
    lesion = draw_lesion(patient_rng(seed, "T1", "lesion"), anat, target, 3.0, location=location, side="R")
    return anat, lesion


def test_rendered_clot_has_exactly_the_requested_volume_and_lies_in_parenchyma() -> None:
    anat, lesion = _patient("basal_ganglia", 17.3)
    geom = draw_geometry(np.random.default_rng(1), anat, 112, 2.0, (2.5, 2.5))
    r = render_scan(anat, geom, Blood(lesion, lesion.baseline_field, 17.3, 17.3), np.random.default_rng(2))
    assert mask_volume_ml(r.iph, (2.0, 2.0, 2.5)) == pytest.approx(17.3, abs=geom.voxel_ml / 2)
    pressed = compress_ventricles(anat, lesion.centre, 17.3)
    label = A.evaluate(pressed, displace(geom.to_head(geom.scanner_points()), lesion.centre, 17.3, anat)).label
    assert np.all(np.isin(label[r.iph > 0], A.PARENCHYMA))
    assert not np.any(r.iph & r.ivh)
    hu = r.hu[r.iph > 0]
    assert 50.0 <= np.median(hu) <= 90.0  # clot HU; noise adds spread


def test_ivh_appears_where_the_clot_reaches_a_ventricle() -> None:
    geom_rng = np.random.default_rng(0)
    for location, target, expect_ivh in (("thalamus", 25.0, True), ("lobar", 8.0, False)):
        anat, lesion = _patient(location, target)
        geom = draw_geometry(geom_rng, anat, 112, 2.0, (2.0, 2.0))
        r = render_scan(anat, geom, Blood(lesion, lesion.baseline_field, target, target), geom_rng)
        assert bool(r.ivh.any()) is expect_ivh, location
        if expect_ivh:  # blood layers in the dependent (posterior) part of the filled compartments
            pressed = compress_ventricles(anat, lesion.centre, target)
            tissue = A.evaluate(pressed, displace(geom.to_head(geom.scanner_points()), lesion.centre, target, anat))
            filled = np.isin(tissue.compartment, list(r.fill))
            y = geom.to_head(geom.scanner_points())[1]
            assert y[(r.ivh > 0) & filled].mean() < y[filled].mean()


def test_growth_is_irregular_contains_the_baseline_and_reaches_the_target() -> None:
    anat, lesion = _patient("lobar", 12.0)
    geom = draw_geometry(np.random.default_rng(3), anat, 112, 2.0, (1.0, 1.0))
    bl = render_scan(anat, geom, Blood(lesion, lesion.baseline_field, 12.0, 12.0), np.random.default_rng(4))
    fu = render_scan(anat, geom, Blood(lesion, followup_field(lesion, bl.level), 24.0, 24.0, bl.fill),
                     np.random.default_rng(4))
    assert mask_volume_ml(fu.iph, (2.0, 2.0, 1.0)) == pytest.approx(24.0, abs=0.01)
    assert np.count_nonzero(bl.iph & fu.iph) >= 0.97 * np.count_nonzero(bl.iph)
    # not a scaled copy: growth along the 3 principal axes of the baseline differs clearly
    pts = np.stack(geom.to_head(geom.scanner_points()), -1) * 1.0
    b, f = pts[bl.iph > 0], pts[fu.iph > 0]
    axes = np.linalg.eigh(np.cov(b.T))[1]
    spread = np.sqrt(np.var(f @ axes, axis=0) / np.var(b @ axes, axis=0))
    assert spread.max() / spread.min() > 1.15, spread


def test_mass_effect_grows_with_volume_and_compresses_the_ventricle() -> None:
    anat, lesion = _patient("basal_ganglia", 20.0)
    midline = tuple(np.array([v], np.float32) for v in (0.0, *lesion.centre[1:]))
    shifts = [abs(float(displace(midline, lesion.centre, v, anat)[0][0])) for v in (5.0, 20.0, 60.0)]
    assert 0 < shifts[0] < shifts[1] < shifts[2] <= 10.0
    g = np.arange(-50, 50, 1.5, dtype=np.float32)
    pts = tuple(np.meshgrid(g, g, g, indexing="ij"))
    count = {v: np.bincount(A.evaluate(compress_ventricles(anat, lesion.centre, v),
                                       displace(pts, lesion.centre, v, anat)).compartment.ravel(), minlength=5)
             for v in (0.0, 15.0, 40.0)}
    assert count[40.0][2] < 0.85 * count[0.0][2] and count[40.0][2] < count[15.0][2] < count[0.0][2]
    assert count[40.0][1] > 0.8 * count[0.0][1]  # the far side is much less affected


# --- cohort outputs -----------------------------------------------------------------------------

def _small_config(tmp_path: Path, seed: int = 7, sites: dict | None = None) -> dict:
    cfg = copy.deepcopy(load_config(None))
    cfg["results_dir"] = str(tmp_path / "results")
    syn = cfg["cohort"]["synthetic"]
    syn.update(seed=seed, sites=sites or {"A": 2, "D": 2}, test_sites=["D"], matrix=64, inplane_mm=3.5,
               slice_thickness_mm=[2.5, 5.0], expander_fraction=[0.0, 1.0])
    syn["n_patients"] = sum(syn["sites"].values())
    return cfg


def _arrays(raw: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(raw)): np.asarray(nib.load(p).dataobj) for p in sorted(raw.rglob("*.nii.gz"))}


def test_synth_is_deterministic_by_seed_and_per_patient(tmp_path: Path) -> None:
    cfg1, cfg2 = _small_config(tmp_path / "a"), _small_config(tmp_path / "b")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg1))
    assert main(["synth", "--config", str(path), "--no-progress"]) == 0  # through the CLI once
    synthesize(cfg2, progress=False)
    raw1, raw2 = Path(cfg1["results_dir"]) / "raw", Path(cfg2["results_dir"]) / "raw"
    a1, a2 = _arrays(raw1), _arrays(raw2)
    assert a1.keys() == a2.keys() and len(a1) == 4 * 6
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)
    for name in ("manifest.tsv", "clinical.tsv"):
        assert (raw1 / name).read_bytes() == (raw2 / name).read_bytes()
    # another seed gives other images; one more patient leaves the others' images unchanged
    cfg3 = _small_config(tmp_path / "c", seed=8)
    synthesize(cfg3, progress=False)
    a3 = _arrays(Path(cfg3["results_dir"]) / "raw")
    assert not np.array_equal(a1["A001/baseline_ct.nii.gz"], a3["A001/baseline_ct.nii.gz"])
    cfg4 = _small_config(tmp_path / "d", sites={"A": 3, "D": 2})
    synthesize(cfg4, progress=False)
    a4 = _arrays(Path(cfg4["results_dir"]) / "raw")
    assert all(np.array_equal(a1[k], a4[k]) for k in a1)


def test_outputs_match_the_manifest_and_the_truth(tmp_path: Path) -> None:
    cfg = _small_config(tmp_path, seed=11)
    truth = synthesize(cfg, progress=False)
    raw = Path(cfg["results_dir"]) / "raw"
    df = read_manifest(raw / "manifest.tsv")  # validates IDs, splits, files and clinical ranges
    assert list(df["patient_id"]) == ["A001", "A002", "D001", "D002"]
    assert list(df["split"]) == ["train", "train", "test", "test"]
    assert Path(df.loc[0, "baseline_ct"]).is_dir()  # DICOM folder when 'dicom' in formats
    clinical = pd.read_csv(raw / "clinical.tsv", sep="\t")
    for row in df.itertuples():
        vol = {}
        for tp in ("baseline", "followup"):
            img = nib.load(getattr(row, f"{tp}_iph"))
            ct = nib.load(raw / row.patient_id / f"{tp}_ct.nii.gz")
            assert img.shape == ct.shape and np.allclose(img.affine, ct.affine)
            assert img.get_data_dtype() == np.uint8
            vol[tp] = mask_volume_ml(np.asarray(img.dataobj), img.header.get_zooms())
        assert row.baseline_iph_ml == pytest.approx(vol["baseline"], abs=1e-6)
        assert row.expansion == int(is_expansion(vol["baseline"], vol["followup"]))
        p = truth["patients"][row.patient_id]
        assert p["volumes_ml"]["followup"]["iph"] == pytest.approx(vol["followup"], abs=1e-6)
        assert p["realised"]["followup_ml"] == pytest.approx(vol["followup"], abs=0.02)  # within a voxel
        assert p["expansion"] == p["realised"]["expansion"] == bool(row.expansion)
        assert 1000 <= p["scans"]["baseline"]["brain_ml"] <= 1600
        assert clinical.set_index("patient_id").loc[row.patient_id, list(CLINICAL_NAMES)].tolist() == \
            pytest.approx([getattr(row, c) for c in CLINICAL_NAMES])
    assert set(truth["law"]) == set(DEFAULT_LAW)


def test_cohort_check_rejects_a_split_outside_the_fraction() -> None:
    truth = {"splits": {"test": {"n": 6, "expanders": 2, "fraction": 2 / 6}}, "patients": {}}
    with pytest.raises(CohortCheckError, match="split test: 2 of 6 expanders, allowed 1-1"):
        check_cohort(truth, [0.15, 0.30])


def test_config_with_inconsistent_patient_count_is_rejected(tmp_path: Path) -> None:
    from hemexp.core.config import ConfigError

    cfg = _small_config(tmp_path)
    cfg["cohort"]["synthetic"]["n_patients"] = 5
    with pytest.raises(ConfigError, match="n_patients"):
        synthesize(cfg, progress=False)


@pytest.fixture(scope="module")
def default_cohort(tmp_path_factory) -> tuple[dict, Path]:
    cfg = load_config(None)
    cfg["results_dir"] = str(tmp_path_factory.mktemp("default") / "results")
    return synthesize(cfg, progress=False), Path(cfg["results_dir"]) / "raw"


@pytest.mark.slow
def test_default_cohort_has_both_classes_in_every_split(default_cohort) -> None:
    truth, raw = default_cohort
    assert set(truth["splits"]) == {"train", "test"}
    lo, hi = load_config(None)["cohort"]["synthetic"]["expander_fraction"]
    for s in truth["splits"].values():
        assert 0 < s["expanders"] < s["n"] and lo <= s["fraction"] <= hi
    assert main(["validate-manifest", str(raw / "manifest.tsv")]) == 0
    pats = truth["patients"].values()
    assert all(1000 <= p["scans"][tp]["brain_ml"] <= 1600 for p in pats for tp in ("baseline", "followup"))
    ivh = np.mean([p["ivh"]["baseline"] for p in pats])
    assert 0.15 <= ivh <= 0.6  # paper: ~40 % IVH
    assert {p["lesion"]["location"] for p in pats} == {"basal_ganglia", "thalamus", "lobar"}
