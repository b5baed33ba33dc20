"""`hemexp sample` and `hemexp simulate` end to end with tiny random models: every declared product is
written (model grid and native space), volumes agree with the masks, the flag source is honoured and
bad input fails cleanly; clinical parsing and scenario overrides."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from test_sampling import CLINICAL, save_tiny_models, synthetic_baseline, write_patient_dir

from hemexp.cli import main
from hemexp.core.clinical import mask_volume_ml
from hemexp.sampling.scenarios import apply_scenario
from hemexp.sampling.simulate import clinical_values, parse_assignments, scenario_from_sets

N = 3


def _config(root: Path, **sampling) -> Path:
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    cfg["results_dir"] = str(root / "results")
    cfg["sampling"].update(n_samples=N, ddim_steps=2, chunk_size=8, z_margin_mm=3.0, **sampling)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A results folder as the workflow leaves it before `sample`: one preprocessed test patient with a
    known follow-up, tiny models for two variants, latent stats."""
    root = tmp_path_factory.mktemp("sampling")
    results = root / "results"
    base = synthetic_baseline(shape=(16, 16, 10))
    fu = {"ct": base["ct"], "iph": np.roll(base["iph"], 1, axis=0) | base["iph"], "ivh": base["ivh"]}
    pdir = results / "preprocessed" / "D001"
    write_patient_dir(pdir, base, followup=fu)
    summary = {"patient_id": "D001", "split": "test", "site": "D", "expansion": True, "he_prob": 0.3,
               "clinical": CLINICAL, "volumes_ml": {"baseline": {"iph": 10.0, "ivh": 0.2, "total": 10.2}}}
    (pdir / "summary.json").write_text(json.dumps(summary))
    save_tiny_models(results / "models", {"2D-ice": ("ice", 1), "2.5D3-ice": ("ice", 3)})
    return root, base, fu


def test_sample_writes_every_declared_product(pipeline):
    root, base, fu = pipeline
    cfg = _config(root)
    assert main(["sample", "2D-ice", "D001", "--config", str(cfg)]) == 0
    out = root / "results" / "samples" / "2D-ice" / "D001"
    declared = (["summary.json", "volumes.tsv", "figure.png"] + [f"maps/{k}_prob.nii.gz" for k in ("iph", "ivh", "new")]
                + [f"native/{k}_prob.nii.gz" for k in ("iph", "ivh", "new")]
                + [f"samples/sample_{k:02d}_{m}.nii.gz" for k in range(N) for m in ("ct", "iph", "ivh")])
    assert all((out / f).is_file() for f in declared), [f for f in declared if not (out / f).is_file()]
    table = pd.read_csv(out / "volumes.tsv", sep="\t")
    summary = json.loads((out / "summary.json").read_text())
    assert len(table) == N and (table["flag"] == 1).all() and summary["flag"]["source"] == "oracle"
    for k, row in table.iterrows():
        iph = nib.load(str(out / f"samples/sample_{k:02d}_iph.nii.gz"))
        data = np.asarray(iph.dataobj)
        assert set(np.unique(data)) <= {0, 1}
        assert row["iph_ml"] == pytest.approx(mask_volume_ml(data, (3.0, 3.0, 3.0)), abs=1e-3)
        ct = np.asarray(nib.load(str(out / f"samples/sample_{k:02d}_ct.nii.gz")).dataobj)
        assert ct.dtype == np.float32 and ct.max() <= 100.0 + 1e-3
    native = json.loads((root / "results/preprocessed/D001/transforms/native_grid.json").read_text())
    assert nib.load(str(out / "native/iph_prob.nii.gz")).shape == tuple(native["shape"])
    truth = summary["true_followup_ml"]
    assert truth["iph"] == pytest.approx(mask_volume_ml(fu["iph"], (3.0, 3.0, 3.0)))
    assert summary["sampled_slices"][0] >= 0 and summary["timings_s"]["total_s"] > 0
    assert set(summary["followup_ml"]["total"]) == {"median", "interval_80"}


def test_sample_probability_flag_source_splits_and_mixes(pipeline):
    root, *_ = pipeline
    cfg = _config(root, flag_source="external")
    out = root / "ext"
    assert main(["sample", "2.5D3-ice", "D001", "--config", str(cfg), "--out", str(out), "--n-samples", "5"]) == 0
    table = pd.read_csv(out / "volumes.tsv", sep="\t")
    assert table["flag"].tolist() == [1, 1, 0, 0, 0]  # he_prob 0.3 -> n1 = floor(1.5 + 0.5) = 2
    maps = {k: np.asarray(nib.load(str(out / f"maps/iph_prob{k}.nii.gz")).dataobj) for k in ("", "_flag1", "_flag0")}
    assert np.allclose(maps[""], 0.3 * maps["_flag1"] + 0.7 * maps["_flag0"], atol=1e-6)


def test_sample_without_required_flag_input_fails_cleanly(pipeline):
    root, *_ = pipeline
    summary_path = root / "results/preprocessed/D001/summary.json"
    original = summary_path.read_text()
    summary_path.write_text(json.dumps({**json.loads(original), "he_prob": None}))
    try:  # a patient without the manifest's he_prob: recorded as this patient's failure
        assert main(["sample", "2D-ice", "D001", "--config", str(_config(root, flag_source="external")),
                     "--out", str(root / "none")]) == 1
    finally:
        summary_path.write_text(original)
    record = json.loads((root / "results/qc/failures/sample__D001.json").read_text())
    assert "he_prob" in record["problem"] and not (root / "none").exists()
    # no trained classifier is the workflow's problem, not the patient's: an error naming the file
    with pytest.raises(SystemExit, match="classifier.joblib"):
        main(["sample", "2D-ice", "D001", "--config", str(_config(root, flag_source="classifier")),
              "--out", str(root / "none")])
    assert not (root / "none").exists()


# ----------------------------------------------------------------------------- simulate


def test_clinical_parsing_and_scenarios():
    given = parse_assignments(["age=71", "gcs=13", "sbp=182", "onset_to_ct_h=2.5", "anticoagulant=0",
                               "antiplatelet=1"], "--clinical")
    values = clinical_values(given, measured_iph_ml=12.3456)
    assert values["baseline_iph_ml"] == pytest.approx(12.346) and values["age"] == 71.0
    scen = scenario_from_sets(["onset_to_ct_h=+6", "sbp=-30", "anticoagulant=toggle", "gcs=3", "age=+100"])
    out = apply_scenario(values, scen)
    assert out["onset_to_ct_h"] == 8.5 and out["sbp"] == 152.0 and out["anticoagulant"] == 1.0
    assert out["gcs"] == 3.0 and out["age"] == 100.0  # clamped to the model's range
    with pytest.raises(ValueError, match="plausible"):
        clinical_values(given | {"gcs": "20"}, 1.0)
    for bad, word in ((["height=180"], "unknown"), (["age"], "key=value")):
        with pytest.raises(ValueError, match=word):
            parse_assignments(bad, "--clinical")
    with pytest.raises(ValueError, match="missing"):
        clinical_values({"age": 50}, 1.0)


def test_simulate_from_files_end_to_end(tmp_path, capsys):
    """Phantom head files + phantom template + tiny models -> products, native files on the CT's grid."""
    from test_pipeline import _template
    from test_register import _rotation, head_phantom

    ct, iph, ivh = head_phantom((3.0, 3.0, 4.0), _rotation(np.array([3, -4, 6])), (4, -3, 2), lesion_mm=14.0, ivh=True)
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, img in (("ct", ct), ("iph", iph), ("ivh", ivh)):
        nib.save(img, raw / f"{name}.nii.gz")
    tmpl, tmask = _template(tmp_path)
    results = tmp_path / "results"
    save_tiny_models(results / "models", {"2D-ice": ("ice", 1)})
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["preprocess"].update(skullstrip="builtin", spacing_mm=[6.0, 6.0, 6.0], crop=[32, 32], registration_mm=4.0)
    cfg["sampling"].update(ddim_steps=2, n_samples=N, z_margin_mm=6.0)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sim"
    argv = ["simulate", "--ct", raw / "ct.nii.gz", "--iph", raw / "iph.nii.gz", "--ivh", raw / "ivh.nii.gz",
            "--clinical", "onset_to_ct_h=1.5", "age=77", "gcs=12", "sbp=190", "anticoagulant=0", "antiplatelet=0",
            "--set", "anticoagulant=1", "onset_to_ct_h=+6", "--variant", "2D-ice", "--flag", "0.6",
            "--template", tmpl, "--template-mask", tmask, "--out", out, "--config", tmp_path / "c.yaml", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "P(expansion)" in printed and "follow-up IPH" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clinical"]["anticoagulant"] == 1.0 and summary["clinical"]["onset_to_ct_h"] == 7.5
    assert summary["clinical_given"]["anticoagulant"] == 0.0
    assert summary["flag"]["n_flag1"] == 2 and summary["flag"]["n_flag0"] == 1
    assert summary["true_followup_ml"] is None and summary["baseline_native_ml"]["iph"] > 0
    for k in range(N):
        img = nib.load(str(out / f"native/sample_{k:02d}_iph.nii.gz"))
        assert img.shape == ct.shape and np.allclose(img.affine, nib.as_closest_canonical(ct).affine)
    assert (out / "baseline" / "transforms" / "bl_to_template.mat").is_file() and (out / "figure.png").is_file()
    # overwrite with a bad request: no classifier in the model folder -> clean error, products kept
    argv[argv.index("0.6")] = "classifier"
    assert main([str(a) for a in argv]) == 2
    assert "classifier" in capsys.readouterr().err and (out / "summary.json").is_file()
