"""Same-patient check of the follow-up: the affine's principal scale factors on transforms with known
answers, the decision rule, and the one-line failure the preprocess stage raises."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_register import _rotation

from hemexp.core.errors import PatientInputError
from hemexp.preprocess.identity import affine_measures, affine_scales, identity_failure

ROT = _rotation(np.array([17.0, -8.0, 31.0]))


@pytest.mark.parametrize("matrix, expected", [
    (np.eye(3), (1.0, 1.0, 1.0)),
    (ROT, (1.0, 1.0, 1.0)),  # a rigid motion has no scale, whatever its rotation
    (np.diag([1.07, 1.0, 1.0]), (1.07, 1.0, 1.0)),
    (np.diag([0.95, 1.02, 1.04]), (0.95, 1.02, 1.04)),
    (ROT @ np.diag([1.0, 0.94, 1.03]), (1.0, 0.94, 1.03)),  # scale in the baseline frame, then rotated
])
def test_affine_scales_known_answers(matrix, expected):
    out = affine_scales(matrix)
    assert np.allclose([out["scale_x"], out["scale_y"], out["scale_z"]], expected, atol=1e-9)
    assert out["log_det"] == pytest.approx(float(np.log(np.prod(expected))))
    assert out["anisotropy"] == pytest.approx(float(np.log(max(expected) / min(expected))))
    assert out["max_scale_change"] == pytest.approx(max(abs(e - 1) for e in expected))


def test_pure_shear_is_a_scale_change():
    shear = np.eye(3)
    shear[0, 1] = 0.1
    out = affine_scales(shear)
    assert out["log_det"] == pytest.approx(0.0, abs=1e-9)  # volume kept ...
    assert out["max_scale_change"] > 0.04 and out["anisotropy"] > 0.09  # ... but not rigid


def test_affine_measures_read_an_ants_transform(tmp_path):
    import ants

    matrix = ROT @ np.diag([1.06, 1.0, 0.98])
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=matrix,
                                    translation=(4.0, -3.0, 2.0), center=(1.0, 2.0, 3.0))
    ants.write_transform(tx, str(tmp_path / "fu_to_bl.mat"))
    out = affine_measures(tmp_path / "fu_to_bl.mat")
    assert (out["scale_x"], out["scale_y"], out["scale_z"]) == pytest.approx((1.06, 1.0, 0.98), abs=1e-4)


def test_identity_failure_rule():
    same = {"scale_x": 1.004, "scale_y": 0.993, "scale_z": 1.01, "ncc": 0.93}
    assert identity_failure(same, 0.8, 0.03) is None
    why = identity_failure({**same, "scale_x": 1.07}, 0.8, 0.03)
    assert why.startswith("affine scale 1.070 on x (allowed 0.97-1.03")
    assert "scale 0.950 on y" in identity_failure({**same, "scale_y": 0.95}, 0.8, 0.03)
    assert "identity.ncc 0.500 < preprocess.min_identity_ncc 0.8" in identity_failure({**same, "ncc": 0.5}, 0.8, 0.03)
    assert identity_failure({**same, "ncc": float("nan")}, 0.8, 0.03) is not None  # no common brain fails
    assert identity_failure({**same, "scale_x": 1.07, "ncc": 0.5}, None, None) is None  # thresholds off


def test_slice_axis_has_its_own_looser_tolerance():
    thick = {"scale_x": 1.004, "scale_y": 0.993, "scale_z": 0.93, "ncc": 0.9}  # a 5 mm follow-up's short brain
    assert "scale 0.930 on z (allowed 0.97-1.03" in identity_failure(thick, 0.75, 0.03)  # no slice tolerance: in-plane's
    assert identity_failure(thick, 0.75, 0.03, 0.10) is None
    why = identity_failure({**thick, "scale_z": 1.12}, 0.75, 0.03, 0.10)
    assert "affine scale 1.120 on z (allowed 0.90-1.10, preprocess.max_identity_slice_scale_change)" in why
    assert "on x" in identity_failure({**thick, "scale_x": 1.05}, 0.75, 0.03, 0.10)  # in-plane stays tight


def test_another_head_fails_the_patient_in_one_line():
    from hemexp.preprocess.pipeline import _check

    summary = {"volumes_ml_model_grid": {"baseline": {"iph": 5.0}}, "registration": {"brain_dice": 0.97},
               "identity": {"ncc": 0.95, "scale_x": 1.07, "scale_y": 1.0, "scale_z": 0.99}}
    row = pd.Series({"baseline_iph": "bl_iph.nii.gz", "followup_ct": "raw/P9/followup_ct"})
    with pytest.raises(PatientInputError) as err:
        _check(summary, row, "P9", 0.8, 0.75, 0.03, 0.10)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("patient P9, file raw/P9/followup_ct: ")
    assert "does not look like the same head" in msg and "affine scale 1.070 on x (allowed 0.97-1.03" in msg
    assert "another patient's scan" in msg
    summary["identity"].update(scale_x=1.01, scale_z=0.94)
    _check(summary, row, "P9", 0.8, 0.75, 0.03, 0.10)
