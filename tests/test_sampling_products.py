"""Reassembly and products: slices land in the right place, masks are binary and agree with the reported
volumes, flag splitting and map mixing follow the documented weights, native-space mapping round-trips."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from test_sampling import synthetic_baseline, tiny_bundle, write_patient_dir

from hemexp.core.clinical import is_expansion, mask_volume_ml
from hemexp.io.shards import slice_image
from hemexp.sampling.flags import parse_flag_source, plan_flags, resolve_probability, split_counts
from hemexp.sampling.products import (
    assemble,
    frequency_map,
    mix_maps,
    new_hemorrhage,
    probability_maps,
    sample_volumes,
    summarise,
    volume_table,
)
from hemexp.sampling.sampler import SamplerSettings, generate_followups

SPACING = (3.0, 3.0, 3.0)


def test_assemble_replaces_only_sampled_slices_in_shard_layout():
    base = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    images = np.stack([np.full((5, 4), -1.0, np.float32), np.full((5, 4), -2.0, np.float32)])
    images[0, 1, 3] = 7.0  # row y=1, column x=3 of the stored image of slice 2
    vol = assemble(base, images, [2, 4])
    assert vol[3, 1, 2] == 7.0 and np.array_equal(slice_image(vol, 2), images[0])
    untouched = [0, 1, 3, 5]
    assert np.array_equal(vol[:, :, untouched], base[:, :, untouched])
    assert np.all(vol[:, :, 4] == -2.0)


def test_flag_split_and_map_mixing_weights():
    plan = plan_flags(0.4, 5, "external")
    assert split_counts(0.4, 5) == (2, 3) and plan.flags == (1, 1, 0, 0, 0) and plan.map_only == ()
    assert plan.weights == {1: 0.4, 0: pytest.approx(0.6)}
    assert split_counts(0.5, 5) == (3, 2) and split_counts(0.1, 5) == (1, 4) and split_counts(0.0, 5) == (0, 5)
    rng = np.random.default_rng(0)
    masks = (rng.random((5, 3, 3, 2)) > 0.5).astype(np.uint8)
    vols = {"iph": masks, "ivh": np.zeros_like(masks)}
    zero = {"iph": np.zeros((3, 3, 2), np.uint8), "ivh": np.zeros((3, 3, 2), np.uint8)}
    maps = probability_maps(vols, zero, plan.all_flags, plan.weights)
    m1, m0 = masks[:2].mean(axis=0), masks[2:].mean(axis=0)
    assert np.allclose(maps["iph_prob_flag1"], m1) and np.allclose(maps["iph_prob_flag0"], m0)
    assert np.allclose(maps["iph_prob"], 0.4 * m1 + 0.6 * m0)
    assert np.allclose(maps["iph_prob"], masks.mean(axis=0))  # here n1/N = p, so also the plain mean
    odd = plan_flags(0.45, 5, "external")  # still 2 : 3, but mixed with 0.45 / 0.55, not n1/N
    assert odd.flags == plan.flags
    mixed = probability_maps(vols, zero, odd.all_flags, odd.weights)["iph_prob"]
    assert np.allclose(mixed, 0.45 * m1 + 0.55 * m0) and not np.allclose(mixed, masks.mean(axis=0))
    assert np.allclose(maps["new_prob"], maps["iph_prob"])  # empty baseline: all hemorrhage is new


def test_rounding_that_empties_a_flag_adds_one_map_only_sample():
    plan = plan_flags(0.05, 5, "classifier")
    assert plan.flags == (0,) * 5 and plan.map_only == (1,) and plan.all_flags == (0,) * 5 + (1,)
    assert plan.weights == {1: 0.05, 0: 0.95}
    hard = plan_flags(1.0, 5, "oracle")
    assert hard.flags == (1,) * 5 and hard.map_only == () and hard.weights == {1: 1.0}
    a, b = np.full((2, 2), 1.0, np.float32), np.zeros((2, 2), np.float32)
    assert np.allclose(mix_maps({1: a, 0: b}, {1: 0.05, 0: 0.95}), 0.05)
    assert np.allclose(mix_maps({0: b}, {1: 0.3, 0: 0.7}), 0.0)  # a missing flag renormalises


def test_flag_sources_resolve_or_name_what_is_missing():
    assert resolve_probability("oracle", oracle=1) == (1.0, "oracle")
    assert resolve_probability("external", he_prob=0.3) == (0.3, "external")
    assert resolve_probability("0") == (0.0, "user") and resolve_probability(1) == (1.0, "user")
    assert resolve_probability("0.25") == (0.25, "probability")
    assert resolve_probability("classifier", classifier=lambda: 0.7) == (0.7, "classifier")
    for source, kw, word in (("oracle", {}, "label"), ("external", {"he_prob": float("nan")}, "he_prob"),
                             ("classifier", {}, "classifier")):
        with pytest.raises(ValueError, match=word):
            resolve_probability(source, **kw)
    with pytest.raises(ValueError):
        parse_flag_source("maybe")
    with pytest.raises(ValueError):
        parse_flag_source(1.5)


def test_new_hemorrhage_and_frequency_map():
    bl_iph = np.zeros((3, 3, 1), np.uint8)
    bl_iph[1, 1] = 1
    iph = np.ones((3, 3, 1), np.uint8)
    ivh = np.zeros_like(iph)
    ivh[0, 0] = 1
    new = new_hemorrhage(iph, ivh, bl_iph, np.zeros_like(bl_iph))
    assert new.sum() == 8 and new[1, 1, 0] == 0
    assert np.allclose(frequency_map(np.stack([iph, np.zeros_like(iph)])), 0.5)
    with pytest.raises(ValueError):
        frequency_map(np.zeros((0, 2, 2, 2)))


def test_sampled_masks_are_binary_and_match_reported_volumes():
    base = synthetic_baseline()
    plan = plan_flags(0.4, 5, "probability")
    fs = generate_followups(tiny_bundle(), base, SPACING[2], np.full(7, 0.5, np.float32), plan.all_flags,
                            SamplerSettings(steps=2, chunk_size=16), 3.0, 0.5, (0, 100))
    vols = sample_volumes(fs.zs, {"ct": fs.ct_hu, "iph": fs.iph, "ivh": fs.ivh}, base)
    outside = [z for z in range(base["ct"].shape[2]) if z not in set(fs.zs.tolist())]
    for k in range(5):
        assert np.array_equal(vols["iph"][k][:, :, outside], base["iph"][:, :, outside])
        assert np.array_equal(vols["ct"][k][:, :, outside], base["ct"][:, :, outside])
    table = volume_table(vols, base, plan, SPACING, {"patient_id": "P", "variant": "v", "guidance_scale": 1.0})
    voxel_ml = 27.0 / 1000.0
    for k, row in table.iterrows():
        assert set(np.unique(vols["iph"][k])) <= {0, 1} and set(np.unique(vols["ivh"][k])) <= {0, 1}
        assert row["iph_ml"] == pytest.approx(vols["iph"][k].sum() * voxel_ml)
        assert row["total_ml"] == pytest.approx(row["iph_ml"] + row["ivh_ml"])
        assert row["expansion"] == int(is_expansion(row["baseline_iph_ml"], row["iph_ml"]))
    assert table["iph_ml"].nunique() > 1  # the random decoder gives different samples
    assert table["baseline_iph_ml"].iloc[0] == pytest.approx(mask_volume_ml(base["iph"], SPACING))
    summary = summarise(table, plan, {"iph": 1.0, "ivh": 0.0, "total": 1.0}, None)
    lo, hi = summary["followup_ml"]["iph"]["interval_80"]
    assert lo == table["iph_ml"].min() and hi == table["iph_ml"].max()  # N=5: the 80 % interval is the hull
    assert summary["p_expansion"] == pytest.approx(table["expansion"].mean())
    assert summary["p_ivh"] == pytest.approx((table["ivh_ml"] > 0).mean())


def test_native_mapping_round_trips_a_mask_within_one_voxel(tmp_path):
    """A ball drawn in native space, pulled onto the model grid (rotated 8 degrees, shifted) and written
    back to native space by the product writer, lies within one model-grid voxel of the original."""
    from scipy import ndimage

    from hemexp.core.files import read_json
    from hemexp.io.nifti import make_image
    from hemexp.preprocess.register import to_model_grid
    from hemexp.sampling.products import write_native

    base = synthetic_baseline(shape=(20, 20, 14))
    affine = write_patient_dir(tmp_path, base)
    native = read_json(tmp_path / "transforms" / "native_grid.json")
    naff = np.asarray(native["affine"])
    idx = np.indices(native["shape"]).reshape(3, -1)
    pts = (naff[:3, :3] @ idx + naff[:3, 3:4]).T
    ball = (np.linalg.norm(pts - np.array([5.0, -4.0, 3.0]), axis=1) < 9.0).reshape(native["shape"]).astype(np.uint8)
    grid = np.asarray(to_model_grid(make_image(ball, naff), tmp_path, "bl", "label").dataobj)
    assert grid.any()
    write_native(grid.astype(np.uint8), affine, tmp_path, tmp_path / "back.nii.gz", "label")
    back_img = nib.load(str(tmp_path / "back.nii.gz"))
    back = np.asarray(back_img.dataobj) > 0
    assert back.shape == ball.shape and np.allclose(back_img.affine, naff)
    dist_out = ndimage.distance_transform_edt(~ball.astype(bool), sampling=(2.0, 2.0, 2.5))
    dist_in = ndimage.distance_transform_edt(ball.astype(bool), sampling=(2.0, 2.0, 2.5))
    assert dist_out[back].max() <= 3.0 + 1e-6  # nothing farther than one model voxel (3 mm) outside
    assert dist_in[ball & ~back].max() <= 3.0 + 1e-6  # nothing lost deeper than one voxel inside
    assert abs(int(back.sum()) - int(ball.sum())) / ball.sum() < 0.2
