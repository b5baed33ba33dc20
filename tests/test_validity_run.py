"""The validity study through its commands on tiny random models, and residual decoding's contract.

``hemexp validity-sample`` / ``validity-report`` run on hand-written preprocessed patients and a
hand-written truth file; the checks are structural (every ablation row, both decode modes, the
diagnostics, the targets table) because a random model has no behaviour to score. Residual decoding
is checked on its defining property: no change sampled, the baseline comes back exactly.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_latents import as_arrays, fake_latents
from test_sampling import LATENT_C, save_tiny_models, synthetic_baseline, tiny_bundle, write_patient_dir

from hemexp.cli import main
from hemexp.cohort.patients import patients as cohort_patients
from hemexp.core.config import DEFAULT_CONFIG, load_config
from hemexp.core.files import write_json
from hemexp.diffusion.latents import denormalise, save_latents
from hemexp.evaluation.validity.diagnostics import TRUTH_MEASURES
from hemexp.sampling.sampler import decode_followups, decode_reference, encode_baseline

CLIN = {"onset_to_ct_h": 2.0, "anticoagulant": 0.0, "antiplatelet": 1.0, "age": 72.0, "gcs": 13.0, "sbp": 175.0}


def test_residual_decoding_returns_the_baseline_when_no_change_is_sampled():
    bundle, baseline = tiny_bundle("ice"), synthetic_baseline()
    enc = encode_baseline(bundle, baseline, 3.0, 6.0, (0, 100))
    ref = decode_reference(bundle, baseline, enc, (0, 100))
    z = denormalise(enc.centre.unsqueeze(0).repeat(2, 1, 1, 1, 1), bundle.stats).flatten(0, 1)  # Δz = 0, 2 samples
    ct, iph, ivh = decode_followups(bundle, z, 2, "residual", 0.5, reference=ref)
    s = len(enc.zs)
    assert np.array_equal(iph.reshape(2, s, *iph.shape[1:])[1], ref.inputs[:, 1].astype(np.uint8))
    assert np.array_equal(ivh.reshape(2, s, *ivh.shape[1:])[0], ref.inputs[:, 2].astype(np.uint8))
    assert np.allclose(ct.reshape(2, s, *ct.shape[1:])[0], ref.inputs[:, 0], atol=1e-6)
    _, iph_abs, _ = decode_followups(bundle, z, 2, "absolute", 0.5)
    assert not np.array_equal(iph_abs, iph)  # the random VAE's own round trip is not the baseline
    # a sampled change is carried over as is: the residual CT moves exactly as the absolute decoding does
    z2 = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    ct2, _, _ = decode_followups(bundle, z2, 2, "residual", 0.5, reference=ref)
    ct_abs, _, _ = decode_followups(bundle, z, 2, "absolute", 0.5)
    ct2_abs, _, _ = decode_followups(bundle, z2, 2, "absolute", 0.5)
    inside = (ct2 > 0) & (ct2 < 1) & (ct_abs > 0) & (ct2_abs > 0) & (ct_abs < 1) & (ct2_abs < 1)
    assert inside.mean() > 0.2 and np.abs(ct2 - ct).max() > 1e-3
    assert np.allclose((ct2 - ct)[inside], (ct2_abs - ct_abs)[inside], atol=1e-5)


def _study_tree(tmp_path):
    results = tmp_path / "results"
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["results_dir"] = str(results)
    cfg["diffusion"]["variants"] = {"2D-ice": {"context": 1, "conditioning": "ice"},
                                    "2D-i": {"context": 1, "conditioning": "i"}}
    cfg["sampling"].update(variants=["2D-ice", "2D-i"], n_samples=3, ddim_steps=2)
    cfg["evaluation"].update(guidance_scales=[0.0, 1.0], perturbation_variant="2D-ice")
    cfg["evaluation"]["validity"].update(variants=["2D-ice", "2D-i"], effect_samples=2, bootstrap=100,
                                         oracle_draws=200, guidance_rules=["cfg", "projected"])
    save_tiny_models(results / "models", {"2D-ice": ("ice", 1), "2D-i": ("i", 1)}, results)
    law = cfg["cohort"]["synthetic"]["law"]
    patients = {}
    for i, pid in enumerate(("D001", "D002", "D003")):
        base = synthetic_baseline(seed=i)
        grown = np.pad(base["iph"], 1)[:-2, 1:-1, 1:-1] | base["iph"]  # a clot grown by one voxel in x
        fu = {"ct": np.where(grown > 0, 70.0, base["ct"]).astype(np.float32), "iph": grown, "ivh": base["ivh"]}
        pdir = results / "preprocessed" / pid
        write_patient_dir(pdir, base, followup=fu)
        clinical = {**CLIN, "baseline_iph_ml": float(base["iph"].sum() * 27 / 1000)}
        write_json(pdir / "summary.json", {"patient_id": pid, "expansion": i == 0, "clinical": clinical,
                                           "volumes_ml": {"baseline": {"iph": 1.0, "ivh": 0.0}}})
        patients[pid] = {"split": "test", "clinical": clinical}
    write_json(results / "raw" / "truth.json", {"law": law, "patients": patients})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train = [p.patient_id for p in cohort_patients(load_config(path)) if p.split == "train"]
    for i, pid in enumerate([*train, *patients]):  # the denoising-fit diagnostic's latent caches
        lat = fake_latents(pid, "train" if pid in train else "test", flag=i % 2, seed=i)
        arrays = {**as_arrays(lat), "z_bl": lat.z_bl[:, :LATENT_C], "z_fu": lat.z_fu[:, :LATENT_C],
                  "z_bl_flip": lat.z_bl_flip[:, :LATENT_C], "z_fu_flip": lat.z_fu_flip[:, :LATENT_C]}
        save_latents(results / "latents" / f"{pid}.npz", arrays)
    return path, results


def test_validity_commands_write_every_ablation_row(tmp_path):
    cfg, results = _study_tree(tmp_path)
    ids = ["D001", "D002", "D003"]
    for variant in ("2D-ice", "2D-i"):
        assert main(["validity-sample", variant, "--patients", *ids, "--config", str(cfg), "--device", "cpu"]) == 0
    ice = pd.read_csv(results / "validity" / "samples" / "2D-ice.csv")
    assert set(ice["decode"]) == {"absolute", "residual"} and set(ice["part"]) == {"calibration", "effect"}
    cal = ice[(ice["part"] == "calibration") & (ice["decode"] == "residual")]
    assert len(cal) == 3 * 2 * 3  # patients x flags x n_samples
    projected = ice[ice["guidance_rule"] == "projected"]  # the second rule resamples the profile sweep only
    assert set(projected["kind"]) == {"profile"} and set(projected["guidance_scale"]) == {0.0, 1.0}
    cfg_sweep = ice[(ice["guidance_rule"] == "cfg") & (ice["kind"] == "profile")]
    assert len(projected) == len(cfg_sweep)
    key = ["patient_id", "decode", "scenario", "sample", "guidance_scale"]
    both = cfg_sweep.merge(projected, on=key, suffixes=("_cfg", "_proj"))
    at1 = both[both["guidance_scale"] == 1.0]  # the rules coincide at s = 1 (conditional branch only)
    assert np.allclose(at1["total_ml_cfg"], at1["total_ml_proj"])
    only_i = pd.read_csv(results / "validity" / "samples" / "2D-i.csv")
    assert set(only_i["part"]) == {"calibration"}  # no clinical input: no effects to measure
    diag = json.loads((results / "validity" / "samples" / "2D-ice.diagnostics.json").read_text())
    assert diag["n_patients"] == 3 and len(diag["flag_over_baseline"]) == len(diag["noise_steps"])
    assert all(v > 0 for v in diag["flag_rms"]) and all(v > 0 for v in diag["baseline_rms"])
    assert diag["fit"]["test"]["n_items"] == 3 * 4 and diag["fit"]["train"]["n_items"] > 0  # 4 targets each
    assert all(np.isfinite(diag["fit"][s]["explained"]).all() for s in ("train", "test"))
    for rec in diag["patients"]:  # the truth measured as a sample is: the grown clot keeps its z-range
        grid_ml = float(np.sum(nib.load(results / "preprocessed" / rec["patient_id"] / "fu_iph.nii.gz").dataobj)) * 27 / 1000
        assert set(rec["truth_iph_ml"]) == set(TRUTH_MEASURES) and rec["true_flag"] == int(rec["patient_id"] == "D001")
        assert rec["truth_iph_ml"]["grid"] == pytest.approx(grid_ml)
        assert rec["truth_iph_ml"]["sampled_slices"] == pytest.approx(grid_ml)
        assert rec["truth_iph_ml"]["grid"] > rec["baseline_iph_ml"] > 0

    assert main(["validity-report", "--patients", *ids, "--config", str(cfg)]) == 0
    out = results / "validity"
    for name in ("effects", "guidance", "adherence", "calibration", "patient_scores", "targets"):
        assert (out / f"{name}.csv").is_file()
    cal = pd.read_csv(out / "calibration.csv")
    assert set(cal["variant"]) == {"2D-ice / absolute", "2D-ice / residual", "2D-i / absolute", "2D-i / residual"}
    targets = pd.read_csv(out / "targets.csv")
    assert {"adherence flag 1 >= 80 %", "fair CRPS <= 1.5x oracle (total)",
            "guidance separation grows with the scale (projected)"} <= set(targets["target"])
    assert set(pd.read_csv(out / "guidance.csv")["guidance_rule"]) == {"cfg", "projected"}
    truth = pd.read_csv(out / "truth_adherence.csv")
    assert set(truth["measured_on"]) == set(TRUTH_MEASURES) and set(truth["true_flag"]) == {0, 1}
    assert (truth.loc[truth["true_flag"] == 1, "n_patients"] == 1).all()
    assert (out / "validity.png").stat().st_size > 10_000
    md = (out / "study.md").read_text()
    assert "## Targets" in md and "## Diagnostics" in md and "## Adherence of the true follow-ups" in md and "## Summary: targets per ablation row" in md
    header = next(line for line in md.splitlines() if line.startswith("| target"))
    assert "2D-ice / absolute" in header and "2D-i / residual" in header
    numbers = json.loads((out / "study.json").read_text())["numbers"]
    assert numbers["n_test_patients"] == 3 and "2D-ice.residual.total.CRPS_model_over_oracle" in numbers
