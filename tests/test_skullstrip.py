"""Skull stripping: Dice against known brains (analytic head phantom, real template wrapped in a
synthetic skull, the stripped template itself), volume checks and the SynthStrip backend plumbing."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hemexp.core.errors import PatientInputError
from hemexp.preprocess import skullstrip
from hemexp.preprocess.skullstrip import apply_mask, brain_mask

TEMPLATE_DIR = Path("/work/shared/data/ct_template")
TEMPLATE = TEMPLATE_DIR / "scct_unsmooth_SS_0.01.nii.gz"
TEMPLATE_MASK = TEMPLATE_DIR / "scct_unsmooth_SS_0.01_Mask.nii.gz"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _ellipsoid(pts: np.ndarray, centre, axes) -> np.ndarray:
    return (((pts - np.asarray(centre)) / np.asarray(axes)) ** 2).sum(-1)


def head_phantom(seed: int = 0, shape=(112, 112, 64), spacing=(2.0, 2.0, 2.5)) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Analytic head CT (HU) and its true brain mask, in RAS mm around the origin.

    ``head_phantom.hematoma`` holds the true hematoma mask of the last call.

    Brain ellipsoid (grey/white texture, ventricles, a 70 HU hematoma touching the cortex) in a 6 mm
    skull with diploe, a foramen magnum with the spinal cord below, two eyes joined to the brain by
    optic nerves through the skull, scalp, a head holder touching the scalp, PSF blur and noise.
    """
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) * np.array(spacing) / 2
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    pts = nib.affines.apply_affine(affine, idx)
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    centre, axes = (0.0, 5.0, 5.0), np.array((62.0, 78.0, 52.0))
    r_brain = np.sqrt(_ellipsoid(pts, centre, axes))  # 1 on the brain surface
    brain = r_brain <= 1.0
    depth = ndimage.distance_transform_edt(~brain, sampling=spacing)  # mm outside the brain
    hu = np.full(shape, -1000.0)
    hu[depth <= 14.0] = 40.0  # scalp
    skull = (depth > 0) & (depth <= 6.5)
    hu[skull] = np.where(np.abs(depth[skull] - 3.2) < 1.2, 500.0, 1400.0)  # diploe inside cortical tables
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 3) * 40
    hu[brain] = 32.0 + np.clip(texture[brain], -6, 6)
    hu[brain & (r_brain > 0.96)] = 8.0  # sulcal CSF under the skull
    for side in (-1, 1):  # lateral ventricles
        hu[_ellipsoid(pts, (side * 12.0, 10.0, 15.0), (7.0, 25.0, 10.0)) <= 1] = 6.0
    hematoma = brain & (_ellipsoid(pts, (40.0, -10.0, 20.0), (24.0, 18.0, 16.0)) <= 1)  # reaches the cortex
    hu[hematoma] = 70.0
    head_phantom.hematoma = hematoma
    below = z < centre[2] - axes[2] + 8.0  # spinal canal through a foramen magnum
    canal = below & (np.hypot(x - centre[0], y - centre[1] + 10.0) < 9.0)
    hu[canal & (depth > 0)] = 35.0
    hu[below & (depth > 14.0) & (np.hypot(x, y + 10.0) < 16.0) & ~canal] = 1100.0  # vertebra ring
    for side in (-1, 1):  # eyes, orbital fat, optic nerves through the skull
        eye = (side * 32.0, 80.0, -32.0)
        hu[_ellipsoid(pts, eye, (16.0, 14.0, 14.0)) <= 1] = -90.0
        hu[_ellipsoid(pts, eye, (11.0, 11.0, 11.0)) <= 1] = 15.0
        direction = np.array([-side * 0.4, -1.0, 0.6]) / np.linalg.norm([0.4, 1.0, 0.6])
        t = (pts - eye) @ direction  # optic nerve: 2 mm radius, from the eye 45 mm towards the brain
        axis = np.asarray(eye) + np.clip(t, 0, 45.0)[..., None] * direction
        hu[(np.linalg.norm(pts - axis, axis=-1) < 2.0) & ~brain] = 30.0
    holder = (np.abs(np.hypot(x, (y - 5.0) * 0.9) - 94.0) < 3.0) & (y < -40.0)
    hu[holder] = 60.0
    hu = ndimage.gaussian_filter(hu, sigma=0.7) + rng.normal(0, 4.0, shape)
    return nib.Nifti1Image(hu.astype(np.float32), affine), brain


def surface(truth: np.ndarray) -> np.ndarray:
    """True brain voxels next to non-brain (26-neighbourhood)."""
    return truth & ndimage.binary_dilation(~truth, np.ones((3, 3, 3), dtype=bool))


def skull_rim(hu: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Surface voxels reading above ``RIM_HU``: the partial-volume rim of the skull, which the
    builtin method peels by design."""
    return surface(truth) & (hu > skullstrip.RIM_HU)


def test_builtin_recovers_phantom_brain(tmp_path: Path) -> None:
    ct, truth = head_phantom()
    mask, info = brain_mask(ct, "builtin", "P01")
    got = mask.get_fdata() > 0
    hu = ct.get_fdata()
    assert mask.get_data_dtype() == np.uint8 and info["method"] == "builtin"
    assert dice(got, truth) >= 0.95, dice(got, truth)
    brain = truth & ~skull_rim(hu, truth)  # the phantom's blur puts 150-500 HU in its outer layer
    assert dice(got, brain) >= 0.98, dice(got, brain)
    assert np.mean(hu[got] > skullstrip.RIM_HU) < 1e-3  # no bright rim left in the stripped CT
    hematoma = head_phantom.hematoma  # touches the cortex: only its bone-contaminated voxels may go
    assert np.count_nonzero(hematoma & brain & got) >= 0.99 * np.count_nonzero(hematoma & brain)
    voxel_ml = np.prod(ct.header.get_zooms()) / 1000
    assert info["brain_volume_ml"] == pytest.approx(got.sum() * voxel_ml, rel=1e-3)
    assert info["brain_volume_ml"] == pytest.approx(brain.sum() * voxel_ml, rel=0.05)


def test_builtin_is_orientation_independent() -> None:
    """A flipped (LPS-stored) copy of the phantom gives the same mask on the canonical grid."""
    ct, _ = head_phantom(shape=(96, 96, 48), spacing=(2.2, 2.2, 3.0))
    flipped = nib.Nifti1Image(ct.get_fdata()[::-1, ::-1].astype(np.float32),
                              ct.affine @ np.array([[-1, 0, 0, 95], [0, -1, 0, 95], [0, 0, 1, 0], [0, 0, 0, 1]]))
    a, _ = brain_mask(ct, "builtin", "P01")
    b, _ = brain_mask(flipped, "builtin", "P01")
    np.testing.assert_allclose(b.affine, nib.as_closest_canonical(ct).affine)
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())


@pytest.mark.parametrize("thickness", [2.5, 5.0])
def test_builtin_on_simulated_cohort_head(thickness: float) -> None:
    """The synthetic cohort's head (hemexp.cohort.synth): intracranial space recovered with Dice >= 0.95."""
    anatomy = pytest.importorskip("hemexp.cohort.synth.anatomy")
    scan = pytest.importorskip("hemexp.cohort.synth.scan")
    rng = np.random.default_rng(11)
    anat = anatomy.draw_anatomy(rng, 70.0)
    geom = scan.draw_geometry(rng, anat, 112, 2.0, (thickness, thickness))
    hu = scan.render_scan(anat, geom, None, rng).hu
    label = anatomy.evaluate(anat, geom.to_head(geom.scanner_points())).label
    truth = nib.as_closest_canonical(nib.Nifti1Image(np.isin(label, anatomy.INTRACRANIAL).astype(np.uint8), geom.affine))
    mask, info = brain_mask(nib.Nifti1Image(hu, geom.affine), "builtin", "S01")
    assert dice(mask.get_fdata() > 0, truth.get_fdata() > 0) >= 0.95
    np.testing.assert_allclose(mask.affine, truth.affine)


def test_peel_removes_boundary_connected_bone_only() -> None:
    """The rim peel is geodesic: bright voxels reaching the mask surface through bright voxels go
    (however deep), bright voxels enclosed by brain and a clot under the rim stay."""
    idx = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1) - 19.5
    r = np.linalg.norm(idx, axis=-1)
    mask = r <= 16.0
    hu = np.full(mask.shape, 30.0)
    rim = mask & (r > 15.0) & (idx[..., 2] > 4.0)  # partial-volume bone under the vertex
    streak = (np.abs(idx[..., 0]) < 1) & (np.abs(idx[..., 1]) < 1) & (idx[..., 2] > 6.0) & mask
    calcification = r <= 2.5  # interior, not reaching the surface
    clot = mask & (np.linalg.norm(idx - (0.0, 10.0, 8.0), axis=-1) <= 6.0) & ~rim  # 75 HU, under the rim
    hu[rim], hu[streak], hu[calcification], hu[clot] = 450.0, 300.0, 200.0, 75.0
    out = skullstrip.peel_bone_rim(mask, hu)
    assert not np.any(out & (rim | streak))
    assert np.all(out[calcification]) and np.all(out[clot])
    np.testing.assert_array_equal(out, mask & ~(rim | streak))


def test_thick_slice_skull_rim_is_peeled_and_cortical_hematoma_kept(monkeypatch) -> None:
    """5 mm slices of the synthetic cohort average inner-table bone into brain voxels (~450 HU)
    at the vertex and skull base; the peel must remove that rim but keep a clot reaching the cortex."""
    anatomy = pytest.importorskip("hemexp.cohort.synth.anatomy")
    scan = pytest.importorskip("hemexp.cohort.synth.scan")
    lesion_mod = pytest.importorskip("hemexp.cohort.synth.lesion")
    rng = np.random.default_rng(3)
    anat = anatomy.draw_anatomy(rng, 70.0)
    lesion = lesion_mod.draw_lesion(rng, anat, 40.0, 3.0, location="lobar", side="R")
    geom = scan.draw_geometry(rng, anat, 112, 2.0, (5.0, 5.0))
    rendered = scan.render_scan(anat, geom, scan.Blood(lesion, lesion.baseline_field, 40.0, 40.0), rng)
    label = anatomy.evaluate(anat, geom.to_head(geom.scanner_points())).label

    def canonical(a: np.ndarray) -> np.ndarray:
        return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(a, geom.affine)).dataobj)

    truth = canonical(np.isin(label, anatomy.INTRACRANIAL).astype(np.uint8)) > 0
    iph, hu = canonical(rendered.iph) > 0, canonical(rendered.hu)
    ct = nib.Nifti1Image(rendered.hu, geom.affine)
    after = np.asarray(brain_mask(ct, "builtin", "S02")[0].dataobj) > 0
    with monkeypatch.context() as m:  # the same extraction without the peel: the artifact is there
        m.setattr(skullstrip, "peel_bone_rim", lambda mask, hu, rim_hu=0.0: mask)
        before = np.asarray(brain_mask(ct, "builtin", "S02")[0].dataobj) > 0
    assert np.count_nonzero(surface(truth) & iph) >= 100  # the clot does touch the inner table
    assert np.mean(hu[before] > 150) > 0.005
    assert np.mean(hu[after] > 150) < 1e-3
    assert dice(after, truth) >= 0.95
    assert np.count_nonzero(iph & after) >= 0.95 * np.count_nonzero(iph)
    peeled_blood = iph & before & ~after
    assert peeled_blood.any()  # part of the clot lies under the bright rim ...
    assert np.all(hu[peeled_blood] > skullstrip.RIM_HU)  # ... and only those bone-contaminated voxels go


def _template(step: int = 2) -> tuple[nib.Nifti1Image, np.ndarray]:
    if not TEMPLATE.exists() or not TEMPLATE_MASK.exists():
        pytest.skip(f"CT template not available under {TEMPLATE_DIR}")
    img, msk = nib.load(TEMPLATE), nib.load(TEMPLATE_MASK)
    s = (slice(None, None, step),) * 3
    affine = img.affine @ np.diag([step, step, step, 1])
    return nib.Nifti1Image(img.get_fdata(dtype=np.float32)[s], affine), np.asarray(msk.dataobj)[s] > 0


def test_builtin_keeps_the_stripped_template_brain() -> None:
    ct, truth = _template()
    mask, info = brain_mask(ct, "builtin", "template")
    assert dice(mask.get_fdata() > 0, truth) >= 0.9
    assert 800 <= info["brain_volume_ml"] <= 2000


def test_builtin_strips_skull_wrapped_around_real_template_brain() -> None:
    """Real brain shape (sulci, skull base) inside a synthetic skull, scalp and air, blurred + noisy."""
    brain_hu, truth = _template()
    spacing = np.abs(np.diag(brain_hu.affine)[:3])
    dist = ndimage.distance_transform_edt(~truth, sampling=spacing)
    hu = np.where(truth, brain_hu.get_fdata(), -1000.0)
    hu[(dist > 0) & (dist <= 6)] = 1300.0
    hu[(dist > 6) & (dist <= 11)] = 45.0
    rng = np.random.default_rng(3)
    hu = ndimage.gaussian_filter(hu, 0.6) + rng.normal(0, 4.0, hu.shape)
    mask, info = brain_mask(nib.Nifti1Image(hu.astype(np.float32), brain_hu.affine), "builtin", "P02")
    assert dice(mask.get_fdata() > 0, truth) >= 0.95


def test_implausible_volume_is_a_patient_input_error() -> None:
    ct, _ = head_phantom(shape=(64, 64, 32), spacing=(2.0, 2.0, 3.0))
    with pytest.raises(PatientInputError, match=r"patient P03.*implausible brain volume \d+ mL"):
        brain_mask(ct, "builtin", "P03", volume_range_ml=(1500, 2000))
    air = nib.Nifti1Image(np.full((32, 32, 16), -1000.0, dtype=np.float32), np.eye(4))
    with pytest.raises(PatientInputError, match="implausible brain volume 0 mL"):
        brain_mask(air, "builtin", "P03")


def test_apply_mask_keeps_hu_inside_only() -> None:
    ct, truth = head_phantom(shape=(64, 64, 32), spacing=(3.0, 3.0, 4.0))
    mask = nib.Nifti1Image(truth.astype(np.uint8), ct.affine)
    out = apply_mask(ct, mask).get_fdata()
    np.testing.assert_array_equal(out[~truth], 0.0)
    np.testing.assert_allclose(out[truth], ct.get_fdata()[truth], rtol=1e-6)


FAKE_SYNTHSTRIP = """#!{python}
# Stand-in for mri_synthstrip: writes a mask (HU in [-10, 100]) in the input's grid, like the real one.
import sys, nibabel as nib, numpy as np
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
img = nib.load(args["-i"])
d = img.get_fdata()
nib.save(nib.Nifti1Image(((d > -10) & (d < 100)).astype(np.uint8), img.affine), args["-m"])
"""


def test_synthstrip_backend_used_when_on_path(tmp_path: Path, monkeypatch) -> None:
    ct, _ = head_phantom(shape=(64, 64, 32), spacing=(3.0, 3.0, 4.0))
    monkeypatch.setenv("PATH", str(tmp_path))  # no mri_synthstrip
    assert skullstrip.resolve_method("auto") == "builtin"
    with pytest.raises(RuntimeError, match="mri_synthstrip is not on PATH"):
        brain_mask(ct, "synthstrip", "P04")
    exe = tmp_path / "mri_synthstrip"
    exe.write_text(FAKE_SYNTHSTRIP.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    mask, info = brain_mask(ct, "auto", "P04", volume_range_ml=(1, 5000))
    d = ct.get_fdata()
    assert info["method"] == "synthstrip"
    np.testing.assert_array_equal(mask.get_fdata() > 0, (d > -10) & (d < 100))
