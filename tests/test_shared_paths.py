"""Guards for logic that training, sampling, simulation and the guidance study share: each test runs the
two callers of one step on the same input and asks for identical results, so a step cannot drift apart
in one caller (one guided DDIM loop, one baseline encoding, one flag-plan resolver, one HU window, one
baseline preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pipeline import cohort  # noqa: F401  (fixture)
from test_sampling import LATENT_C, SCHED, synthetic_baseline, tiny_bundle, tiny_diffusion

from hemexp.diffusion.latents import denormalise
from hemexp.sampling.sampler import SamplerSettings, generate_followups, sample_deltas

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- 1. one guided DDIM loop


@pytest.mark.parametrize("conditioning,scale", [("ice", 1.0), ("ice", 2.0), ("i", 1.0)])
def test_training_grid_and_sampler_give_identical_deltas_for_the_same_noise(monkeypatch, conditioning, scale):
    """The training sample grid's DDIM (``ddim_sample``) and ``sample_deltas`` (sample / simulate / the
    guidance study) are one loop: the same initial noise gives bit-identical Δz."""
    import hemexp.sampling.noise as noise_mod
    from hemexp.diffusion.train import ddim_sample

    model, n, seed = tiny_diffusion(conditioning), 3, 5
    g = torch.Generator().manual_seed(1)
    baseline = torch.randn(1, LATENT_C, 8, 8, generator=g)
    clinical, flags = torch.rand(n, 7, generator=g), [1, 0, 1]
    grid = ddim_sample(model, SCHED, baseline.repeat(n, 1, 1, 1), clinical, torch.tensor(flags), steps=4,
                       guidance_scale=scale, generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(n, LATENT_C, 8, 8, generator=torch.Generator().manual_seed(seed))  # the grid's draw
    monkeypatch.setattr(noise_mod, "draw", lambda gens, shape: noise.clone())
    out, _ = sample_deltas(model, SCHED, baseline, clinical, flags,
                           SamplerSettings(steps=4, guidance_scale=scale, chunk_size=100, precision="32",
                                           slice_noise="independent"))
    assert out.shape == (n, 1, LATENT_C, 8, 8)
    assert torch.equal(out[:, 0], grid)


# ----------------------------------------------------------------------------- 2. one baseline encoding


class _Stop(Exception):
    pass


def test_sample_command_and_guidance_study_encode_the_same_baseline(monkeypatch):
    """``generate_followups`` (hemexp sample / simulate) and the guidance study's ``BundleSampler`` feed
    the same slices, context latents and centre latents to the sampler."""
    import hemexp.sampling.sampler as smp
    from hemexp.evaluation.guidance.run import BundleSampler

    bundle, base = tiny_bundle(context=3), synthetic_baseline()
    settings, seen = SamplerSettings(steps=2, chunk_size=4), {}

    def fake_deltas(model, sched_cfg, cond, clinical, flags, settings, slice_ids=None, sample_ids=None,
                    progress=None, slice_spacing_mm=None):
        seen["cond"], seen["zs"] = cond, np.asarray(slice_ids)
        return torch.zeros(len(flags), cond.shape[0], LATENT_C, *cond.shape[-2:]), {"seconds": 0.0}

    def fake_decode(vae, z, device, batch=64):
        seen["z_fu"] = z  # = denormalise(centre + 0)
        raise _Stop

    monkeypatch.setattr(smp, "sample_deltas", fake_deltas)
    monkeypatch.setattr(smp, "decode_probabilities", fake_decode)  # under every decode mode
    with pytest.raises(_Stop):
        generate_followups(bundle, base, 3.0, np.full(7, 0.5, np.float32), [1], settings, z_margin_mm=3.0,
                           mask_threshold=0.5, hu_window=(0, 100))
    study = BundleSampler(bundle, base, (3.0, 3.0, 3.0), settings, 3.0, 0.5, (0, 100))
    assert seen["zs"].tolist() == study.zs.tolist() == [3, 4, 5, 6, 7]
    assert torch.equal(study.cond, seen["cond"]) and study.cond.shape == (5, 3 * LATENT_C, 8, 8)
    assert torch.equal(denormalise(study.centre, bundle.stats), seen["z_fu"])


# ----------------------------------------------------------------------------- 3. one flag-plan resolver


def _summary(expansion: bool = True, he_prob: float | None = 0.3) -> dict:
    from test_sampling import CLINICAL

    return {"patient_id": "D001", "expansion": expansion, "he_prob": he_prob, "clinical": dict(CLINICAL),
            "volumes_ml": {"baseline": {"iph": 10.0, "ivh": 0.2, "total": 10.2}}}


@pytest.mark.parametrize("source,expect_label,expect_p,n1", [
    ("oracle", "oracle", 1.0, 5), ("external", "external", 0.3, 2), (0, "user", 0.0, 0), ("1", "user", 1.0, 5),
    (0.5, "probability", 0.5, 3), ("classifier", "classifier", 0.8, 4),
])
def test_flag_plan_for_every_source(tmp_path, monkeypatch, source, expect_label, expect_p, n1):
    import hemexp.sampling.flags as flags
    from hemexp.core.config import load_config
    from hemexp.core.layout import Layout

    cfg = {**load_config(), "results_dir": str(tmp_path)}
    asked = {}

    def fake_classifier(path, features):
        asked.update(path=path, features=features)
        return 0.8

    monkeypatch.setattr(flags, "classifier_probability", fake_classifier)
    plan = flags.flag_plan_for(cfg, "D001", _summary(), source, 5)
    assert (plan.source, plan.p, plan.flags.count(1), plan.n_samples) == (expect_label, expect_p, n1, 5)
    if source == "classifier":
        assert asked["path"] == str(Layout.of(cfg).classifier)
        assert asked["features"]["baseline_ivh_ml"] == 0.2 and asked["features"]["gcs"] == 13.0
    else:
        assert not asked  # the classifier is loaded only when it is the source


def test_flag_plan_for_names_the_patient_when_an_input_is_missing(tmp_path):
    from hemexp.core.config import load_config
    from hemexp.core.errors import PatientInputError
    from hemexp.sampling.flags import flag_plan_for

    cfg = {**load_config(), "results_dir": str(tmp_path)}
    with pytest.raises(PatientInputError, match="he_prob"):
        flag_plan_for(cfg, "D001", _summary(he_prob=None), "external", 5)
    assert flag_plan_for(cfg, "D001", _summary(expansion=False), "oracle", 4).flags == (0, 0, 0, 0)


def test_guidance_study_uses_the_flag_plan_of_the_sample_command(tmp_path):
    """``trained_loader`` (guidance study) plans the flags exactly as ``hemexp sample`` does."""
    import json

    from test_sampling import write_patient_dir

    from hemexp.core.config import load_config
    from hemexp.evaluation.guidance.run import trained_loader
    from hemexp.sampling.flags import flag_plan_for

    cfg = load_config()
    cfg = {**cfg, "results_dir": str(tmp_path), "sampling": {**cfg["sampling"], "flag_source": 0.4}}
    pdir = tmp_path / "preprocessed" / "D001"
    write_patient_dir(pdir, synthetic_baseline())
    (pdir / "summary.json").write_text(json.dumps(_summary()))
    study = trained_loader(cfg, tiny_bundle(), SamplerSettings(steps=2, chunk_size=4), 5)("D001")
    assert study.flags == flag_plan_for(cfg, "D001", _summary(), 0.4, 5).flags == (1, 1, 0, 0, 0)


# ----------------------------------------------------------------------------- 4. one HU window


def test_training_and_inference_window_the_ct_identically(tmp_path):
    """The VAE's training items (shards -> SliceDataset) and the sampler's VAE inputs (model-grid NIfTI
    arrays -> slice_stack) are the same arrays for the same HU volume and window, CT outside the window
    and fractional HU included; unwindow_ct inverts the window inside it."""
    from test_shards import make_volumes, write_patient

    from hemexp.sampling.sampler import slice_stack
    from hemexp.vae.data import patient_dataset, unwindow_ct

    vols = make_volumes(4)
    vols["bl_ct"][0, 0, :] = [-1000.0, 3000.0] * 10  # outside any window
    hu = (-15.0, 85.5)
    ds = patient_dataset(write_patient(tmp_path / "P1.parquet", vols), context=1, hu_window=hu)
    zs = [int(z) for z in ds.rows["z"]]
    inference = slice_stack(vols["bl_ct"], vols["bl_iph"], vols["bl_ivh"], zs, hu)
    training = np.stack([ds[i]["bl"].numpy() for i in range(len(ds))])
    assert inference.dtype == training.dtype == np.float32
    np.testing.assert_array_equal(inference, training)
    inside = (vols["bl_ct"] > hu[0]) & (vols["bl_ct"] < hu[1])
    ct01 = np.clip((vols["bl_ct"] - hu[0]) / (hu[1] - hu[0]), 0, 1)
    np.testing.assert_allclose(unwindow_ct(ct01, hu)[inside], vols["bl_ct"][inside], atol=1e-4)


# ----------------------------------------------------------------------------- 5. one baseline preprocessing


def test_simulate_prepares_the_baseline_exactly_as_the_pipeline(cohort, tmp_path):  # noqa: F811
    """``hemexp simulate``'s baseline-only preprocessing (ingest, skull strip, rigid registration to the
    template, model-grid resampling) writes the same model-grid baseline, brain mask and transforms as
    ``hemexp ingest`` + ``hemexp preprocess`` for the same scans."""
    import nibabel as nib

    from hemexp.core.config import load_config
    from hemexp.preprocess.pipeline import ingest_patient, preprocess_patient
    from hemexp.sampling.simulate import prepare_baseline

    cfg_path, _, raw = cohort
    cfg = load_config(cfg_path)
    ingest_patient(cfg, "P02", tmp_path / "ingested")
    pipe = preprocess_patient(cfg, "P02", tmp_path / "preprocessed", tmp_path / "ingested")
    sim = prepare_baseline(cfg, "P02", raw / "P02/baseline_ct.nii.gz", raw / "P02/baseline_iph.nii.gz",
                           raw / "P02/baseline_ivh.nii.gz", tmp_path / "simulated")
    for name in ("bl_ct", "bl_iph", "bl_ivh", "brain_bl"):
        a, b = (nib.load(tmp_path / d / f"{name}.nii.gz") for d in ("preprocessed", "simulated"))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj), err_msg=name)
        np.testing.assert_array_equal(a.affine, b.affine)
    for name in ("bl_to_template.mat", "model_grid.json", "native_grid.json"):
        assert (tmp_path / "preprocessed/transforms" / name).read_bytes() == \
            (tmp_path / "simulated/transforms" / name).read_bytes(), name
    assert sim["volumes_ml"]["baseline"] == pipe["volumes_ml"]["baseline"]
    assert sim["volumes_ml_model_grid"]["baseline"] == pipe["volumes_ml_model_grid"]["baseline"]
