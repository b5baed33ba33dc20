"""Registration: a known random rigid motion of a synthetic head is recovered within 1 mm and 1 degree;
NIfTI <-> ANTs geometry conversion; the model grid covers the template brain."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hemexp.io.nifti import make_image


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def head_phantom(spacing=(2.0, 2.0, 2.0), rotation=None, translation=(0.0, 0.0, 0.0),
                 lesion_mm=12.0, ivh=False, fov_mm=(200.0, 230.0, 190.0)):
    """A head CT in HU (scalp, skull, textured brain, asymmetric ventricles, a hematoma) posed by
    ``rotation``/``translation`` (anatomy -> scanner RAS mm). Returns (ct, iph, ivh) NIfTI images.

    Anatomy is an analytic function of anatomy coordinates, so posed copies are exact rigid motions
    of each other (up to sampling) -- what a registration test needs.
    """
    shape = tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing, strict=True))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2.0 * np.array(spacing)
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    pts = affine[:3, :3] @ idx + affine[:3, 3:4]
    rotation = np.eye(3) if rotation is None else np.asarray(rotation)
    x, y, z = rotation.T @ (pts - np.asarray(translation, dtype=np.float64)[:, None])
    # egg-shaped brain (wider posteriorly) so no rotation maps it onto itself
    ax = 62.0 * (1.0 - 0.08 * y / 78.0)
    r = np.sqrt((x / ax) ** 2 + (y / 78.0) ** 2 + (z / 56.0) ** 2)
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    hu[r < 1.0 + 12.0 / 62.0] = 40.0  # scalp
    hu[r < 1.0 + 7.0 / 62.0] = 900.0  # skull
    brain = r < 1.0
    texture = 4.0 * np.sin(0.11 * x + 0.3) * np.cos(0.07 * y) + 3.0 * np.sin(0.09 * z + 0.05 * y)
    hu[brain] = np.where(r[brain] > 0.8, 38.0, 28.0) + texture[brain]
    vent = (((x - 9) / 5) ** 2 + ((y - 4) / 20) ** 2 + ((z - 10) / 8) ** 2 < 1) | (
        ((x + 11) / 6) ** 2 + ((y + 2) / 24) ** 2 + ((z - 8) / 7) ** 2 < 1)
    hu[vent] = 5.0
    iph = ((x - 30) ** 2 + (y - 12) ** 2 + (z - 4) ** 2) < lesion_mm**2
    hu[iph] = 65.0
    ivh_mask = vent & (z < 8) if ivh else np.zeros_like(vent)
    hu[ivh_mask] = 55.0
    to_img = lambda a, dt: make_image(a.reshape(shape).astype(dt), affine)  # noqa: E731
    return to_img(hu, np.float32), to_img(iph, np.uint8), to_img(ivh_mask, np.uint8)


def _brain_only(ct):
    data = np.asarray(ct.dataobj)
    return make_image(np.where((data > -100) & (data < 100), data, 0).astype(np.float32), ct.affine)


def test_nib_ants_roundtrip_keeps_geometry():
    from hemexp.preprocess.register import ants_to_nib, nib_to_ants

    aff = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    back = ants_to_nib(nib_to_ants(make_image(data, aff)))
    assert np.allclose(back.affine, aff) and np.array_equal(np.asarray(back.dataobj), data)


def test_rigid_registration_recovers_known_motion(tmp_path):
    from hemexp.preprocess.register import nib_to_ants, register, rigid_motion

    rng = np.random.default_rng(7)
    angles = rng.uniform(-10, 10, 3)
    shift = rng.uniform(-10, 10, 3)
    rot = _rotation(angles)
    fixed = _brain_only(head_phantom()[0])
    moving = _brain_only(head_phantom(rotation=rot, translation=shift)[0])
    mat = register(nib_to_ants(fixed), nib_to_ants(moving), "Rigid", seed=1, registration_mm=3.0, workdir=tmp_path)

    import ants

    est = ants.read_transform(mat)  # fixed LPS point -> moving LPS point
    flip = np.array([-1.0, -1.0, 1.0])
    pts = np.random.default_rng(1).uniform(-50, 50, (100, 3))  # RAS points inside the brain
    truth = pts @ rot.T + shift
    got = np.array([est.apply_to_point(tuple(p * flip)) for p in pts]) * flip
    err = np.linalg.norm(got - truth, axis=1)
    assert err.max() < 1.0, f"landmark error {err.max():.2f} mm"
    matrix = np.asarray(est.parameters[:9]).reshape(3, 3)
    true_lps = np.diag(flip) @ rot @ np.diag(flip)
    residual = np.degrees(np.arccos(np.clip((np.trace(matrix.T @ true_lps) - 1) / 2, -1, 1)))
    assert residual < 1.0, f"rotation error {residual:.2f} deg"
    motion = rigid_motion(mat)
    assert abs(motion["rotation_deg"] - np.degrees(np.arccos((np.trace(rot) - 1) / 2))) < 1.0


@pytest.mark.parametrize("seed", [0, 3])
def test_registration_is_deterministic(tmp_path, seed):
    """Seed 0 (the config default) included: ANTs reads --random-seed 0 as 'seed from the clock'."""
    from hemexp.preprocess.register import nib_to_ants, register

    fixed = nib_to_ants(_brain_only(head_phantom(spacing=(4.0, 4.0, 4.0))[0]))
    moving = nib_to_ants(_brain_only(head_phantom(spacing=(4.0, 4.0, 4.0), rotation=_rotation(np.array([4, -3, 6])),
                                                  translation=(3, -2, 5))[0]))
    a = register(fixed, moving, "Rigid", seed, 4.0, tmp_path)
    b = register(fixed, moving, "Rigid", seed, 4.0, tmp_path)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_model_grid_is_centred_and_covers_brain():
    from hemexp.preprocess.grid import brain_coverage, model_grid

    ct = head_phantom(spacing=(2.0, 2.0, 2.0))[0]
    mask = make_image(((np.asarray(ct.dataobj) > -100) & (np.asarray(ct.dataobj) < 100)).astype(np.uint8), ct.affine)
    grid = model_grid(mask, [3.0, 3.0, 3.0], [64, 64])
    assert grid.shape[:2] == (64, 64) and grid.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert brain_coverage(grid, mask) == pytest.approx(1.0)
    centre = grid.affine @ np.array([31.5, 31.5, 0, 1.0])
    assert abs(centre[0]) < 1.5 and abs(centre[1] + 78 * 0.0) < 3.0  # brain bbox centre ~ origin in-plane
    small = model_grid(mask, [3.0, 3.0, 3.0], [32, 32])
    assert brain_coverage(small, mask) < 0.9


SCCT = "/work/shared/data/ct_template/scct_unsmooth_SS_0.01.nii.gz"


@pytest.fixture(scope="module")
def real_template():
    from pathlib import Path

    from hemexp.core.config import load_config
    from hemexp.preprocess.template import load_template

    if not Path(SCCT).is_file():
        pytest.skip("real CT template not available")
    cfg = load_config()
    cfg["preprocess"].update(template=SCCT, template_mask=SCCT.replace(".nii.gz", "_Mask.nii.gz"))
    return load_template(cfg)


@pytest.mark.parametrize("config_file", ["config/config.yaml", "config/paper.yaml"])
def test_configured_grid_covers_real_template_brain(real_template, config_file):
    """The demo and paper crops keep the whole brain of the real CT template, and z spans it."""
    from hemexp.core.config import load_config
    from hemexp.preprocess.grid import brain_coverage, model_grid

    template, mask = real_template
    assert template.shape == mask.shape and 1000 < np.asarray(mask.dataobj).sum() / 1000 < 2200  # mL (scct: 1.92 L)
    pre = load_config(config_file)["preprocess"]
    grid = model_grid(mask, pre["spacing_mm"], pre["crop"])
    assert brain_coverage(grid, mask) > 0.999
    assert grid.shape[2] * grid.spacing[2] > 120  # whole brain superior-inferior extent (mm)


def test_itk_thread_default_is_set_before_ants_initialises():
    """Any ``hemexp`` import must pin ITK to one thread before ``ants`` loads ITK, or reruns differ."""
    import subprocess
    import sys

    code = "import os, hemexp.io.nifti, ants; print(os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k != "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
