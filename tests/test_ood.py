"""The out-of-distribution gate: the noise estimate recovers a known noise level, fitted ranges never
flag training patients, and on simulated head CTs an in-distribution scan passes while a scan with
thicker slices and more noise is flagged on exactly those features; clinical values outside the
training range or clamped by the model are reported, not silently changed."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hemexp.cohort.synth.anatomy import draw_anatomy
from hemexp.cohort.synth.scan import draw_geometry, render_scan
from hemexp.sampling.ood import (
    FEATURES,
    fit_envelope,
    fit_feature,
    image_noise_hu,
    native_features,
    score_input,
)


def test_noise_estimate_recovers_known_sd_on_smooth_anatomy():
    rng = np.random.default_rng(0)
    x, y, _ = np.meshgrid(np.linspace(-1, 1, 96), np.linspace(-1, 1, 96), np.arange(6), indexing="ij")
    anatomy = 30.0 + 8.0 * np.sin(2 * x) * np.cos(3 * y)  # smooth parenchyma-like HU
    brain = (x**2 + y**2) < 0.8
    for sd in (2.0, 5.0, 10.0):
        ct = anatomy + rng.normal(0.0, sd, anatomy.shape)
        assert image_noise_hu(ct, brain) == pytest.approx(sd, rel=0.06)


def test_fitted_ranges_keep_training_values_and_respect_sides():
    values = [10.0, 11.0, 9.5, 10.4, 30.0]  # one extreme training value: still inside
    both = fit_feature(values, "both", margin=0.25, rel_floor=0.0)
    assert both["lo"] <= 9.5 and both["hi"] >= 30.0
    high = fit_feature(values, "high", margin=0.25, rel_floor=0.0)
    assert high["lo"] is None and high["hi"] >= 30.0
    assert both["hi"] == pytest.approx(30.0 + 0.25 * 20.5)
    constant = fit_feature([5.0] * 6, "both", margin=1.0, rel_floor=0.05)  # one slice thickness in training
    assert constant["lo"] == pytest.approx(4.75) and constant["hi"] == pytest.approx(5.25)
    env = fit_envelope([{"template_brain_dice": v} for v in (0.90, 0.91, 0.92, 0.93)], [])
    low_side = score_input({"template_brain_dice": 0.99}, {}, env)  # better than training: not OOD
    assert low_side["features"]["template_brain_dice"]["status"] == "ok"
    worse = score_input({"template_brain_dice": 0.5}, {}, env)
    assert worse["features"]["template_brain_dice"]["status"] == "outside" and len(worse["warnings"]) == 1


def _simulated_head(seed: int, thickness: tuple[float, float], extra_noise_hu: float = 0.0):
    rng = np.random.default_rng(seed)
    anat = draw_anatomy(rng, age=float(rng.uniform(55, 85)))
    geom = draw_geometry(rng, anat, 112, 2.0, thickness)
    hu = render_scan(anat, geom, None, rng).hu
    hu = hu + rng.normal(0.0, extra_noise_hu, hu.shape).astype(np.float32) * (hu > -500)
    smooth = ndimage.gaussian_filter(hu, sigma=(2.0, 2.0, 0.0))  # a brain mask that noise does not break
    brain = ndimage.binary_opening((smooth > 10) & (smooth < 60), iterations=2)
    labels, n = ndimage.label(brain)
    brain = labels == (1 + int(np.argmax(ndimage.sum(brain, labels, range(1, n + 1)))))
    return native_features(nib.Nifti1Image(hu, geom.affine), brain)


@pytest.fixture(scope="module")
def envelope():
    rows = [_simulated_head(seed, (1.0, 5.0)) for seed in range(10)]
    return fit_envelope(rows, [], margin=0.25, rel_floor=0.05), rows


def test_training_scans_are_inside_their_own_envelope(envelope):
    env, rows = envelope
    for row in rows:
        scores = score_input(row, {}, env)
        assert scores["in_distribution"], scores["warnings"]


def test_in_distribution_scan_passes_and_shifted_scan_is_flagged(envelope):
    env, _ = envelope
    inside = score_input(_simulated_head(100, (1.0, 5.0)), {}, env)
    assert inside["in_distribution"], inside["warnings"]
    shifted = score_input(_simulated_head(101, (10.0, 10.0), extra_noise_hu=25.0), {}, env)
    flagged = {k for k, row in shifted["features"].items() if row["status"] == "outside"}
    assert flagged == {"native_slice_thickness_mm", "noise_hu"}, shifted["warnings"]
    assert not shifted["in_distribution"] and len(shifted["warnings"]) == 2
    assert shifted["features"]["noise_hu"]["training_percentile"] == 100.0
    assert shifted["features"]["vae_recon_mae_hu"]["status"] == "not scored"  # not measured here


def test_clinical_values_outside_training_or_clamped_are_reported():
    clinical_rows = [{"onset_to_ct_h": h, "age": a} for h, a in ((1.0, 60), (3.0, 70), (6.0, 80))]
    env = fit_envelope([{}], clinical_rows)
    given = {"onset_to_ct_h": 2.0, "age": 75.0}
    scores = score_input({}, given, env, clinical_requested={"onset_to_ct_h": 30.0, "age": 75.0})
    onset = scores["clinical"]["onset_to_ct_h"]
    assert onset["outside"] and onset["clamped"] and onset["model_value"] == 24.0 and onset["given"] == 2.0
    assert not scores["clinical"]["age"]["outside"] and not scores["clinical"]["age"]["clamped"]
    assert any("clamped" in w for w in scores["warnings"]) and any("training range" in w for w in scores["warnings"])
    assert not scores["in_distribution"]


def test_without_envelope_values_are_recorded_not_judged():
    scores = score_input({f.name: 1.0 for f in FEATURES}, {"age": 70.0}, None)
    assert all(row["status"] == "not scored" and row["value"] == 1.0 for row in scores["features"].values())
    assert not scores["in_distribution"] and "no training envelope" in scores["warnings"][0]
