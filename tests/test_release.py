"""Released models (issue 18): a variant registered in a real MLflow registry (SQLite store, no mocks)
carries its bundle, provenance tags, aliases and model card; `hemexp simulate --models
models:/NAME@ALIAS` and `mlflow.pyfunc.load_model(...).predict` run from it; aliases move only by
`hemexp promote`; a bad reference is one clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest
import yaml
from test_sampling import save_tiny_models

from hemexp.cli import main
from hemexp.core.files import write_json
from hemexp.release.bundle import sha256
from hemexp.sampling.ood import fit_envelope

CLINICAL = {"onset_to_ct_h": 1.5, "baseline_iph_ml": 12.0, "anticoagulant": 0, "antiplatelet": 1, "age": 77,
            "gcs": 12, "sbp": 190}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A results folder with tiny models, stats, an OOD envelope and a phantom template, registered once."""
    from test_pipeline import _template
    from test_register import _rotation, head_phantom

    root = tmp_path_factory.mktemp("release")
    results = root / "results"
    save_tiny_models(results / "models", {"2D-ice": ("ice", 1)}, results)
    (results / "template").mkdir(parents=True)
    _template(results / "template")
    write_json(results / "models" / "ood" / "envelope.json",
               fit_envelope([{"native_slice_thickness_mm": t} for t in (3.0, 4.0, 5.0)],
                            [CLINICAL, {**CLINICAL, "age": 60, "onset_to_ct_h": 6.0}]))
    (results / "models" / "diffusion" / "2D-ice" / "summary.json").write_text("{}")
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["tracking"]["uri"] = f"sqlite:///{root / 'registry.db'}"
    cfg["diffusion"]["variants"] = {"2D-ice": {"context": 1, "conditioning": "ice"}}
    cfg["evaluation"]["perturbation_variant"] = "2D-ice"
    cfg["evaluation"]["flag_source_passes"] = {}
    cfg["preprocess"].update(skullstrip="builtin", spacing_mm=[6.0, 6.0, 6.0], crop=[32, 32], registration_mm=4.0)
    cfg["sampling"].update(ddim_steps=2, n_samples=3, z_margin_mm=6.0)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ct, iph, ivh = head_phantom((3.0, 3.0, 4.0), _rotation([3, -4, 6]), (4, -3, 2), lesion_mm=14.0, ivh=True)
    raw = root / "raw"
    raw.mkdir()
    for name, img in (("ct", ct), ("iph", iph), ("ivh", ivh)):
        nib.save(img, raw / f"{name}.nii.gz")
    # MLflow exports MLFLOW_TRACKING_URI whenever a test calls mlflow.set_tracking_uri, and that variable
    # wins over tracking.uri (as a user's would): point it at this module's store for these tests
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = cfg["tracking"]["uri"]
    try:
        assert main(["register-model", "2D-ice", "--config", str(config)]) == 0
        yield root, results, config, raw, cfg
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg["tracking"]["uri"], registry_uri=cfg["tracking"]["uri"])


def test_registered_version_carries_bundle_tags_alias_and_card(released):
    root, results, _, _, cfg = released
    record = json.loads((results / "release/2D-ice/registered.json").read_text())
    assert record["name"] == "hemexp-2D-ice" and record["version"] == "1"
    mv = _client(cfg).get_model_version_by_alias("hemexp-2D-ice", "candidate")
    assert str(mv.version) == "1"
    for tag in ("git_commit", "data_version", "config_hash", "variant", "hemexp_version"):
        assert mv.tags[tag], tag
    bundle = results / "release/2D-ice/bundle"
    info = json.loads((bundle / "bundle.json").read_text())
    for rel in ("models/vae/vae.pt", "models/diffusion/2D-ice/model.pt", "models/latents/stats.json",
                "models/ood/envelope.json", "models/template/template.nii.gz", "config.yaml", "model_card.md"):
        assert info["files"][rel] == sha256(bundle / rel), rel
    assert str(root) not in (bundle / "config.yaml").read_text()  # no site folder names in a shared model
    card = (results / "release/2D-ice/model_card.md").read_text()
    for section in ("## Model details", "## Intended use", "## Training data", "### Table 2", "### Calibration",
                    "## Out-of-distribution envelope", "## Limitations", "## Licence"):
        assert section in card, section
    assert "version 1" in card and "not available" in card  # no evaluation in this fixture: said, not faked
    assert "Reading the demo's results" in card and mv.description == card


def test_promote_sets_champion_and_simulate_runs_from_the_registry(released, capsys):
    root, results, config, raw, cfg = released
    assert main(["register-model", "2D-ice", "--config", str(config)]) == 0  # a second version
    client = _client(cfg)
    assert str(client.get_model_version_by_alias("hemexp-2D-ice", "candidate").version) == "2"
    assert main(["promote", "hemexp-2D-ice", "--version", "1", "--config", str(config)]) == 0
    assert "is now @champion" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("hemexp-2D-ice", "champion").version) == "1"
    out = root / "sim"
    argv = ["simulate", "--ct", raw / "ct.nii.gz", "--iph", raw / "iph.nii.gz", "--ivh", raw / "ivh.nii.gz",
            "--clinical", *[f"{k}={v}" for k, v in CLINICAL.items() if k != "baseline_iph_ml"],
            "--flag", "0.5", "--models", "models:/hemexp-2D-ice@champion", "--out", out, "--config", config,
            "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"].endswith("registry/hemexp-2D-ice/v1/models")
    assert (results / "registry/hemexp-2D-ice/v1/.complete").is_file()
    assert summary["ood"]["envelope"]["n_patients"] == 3 and "features" in summary["ood"]
    assert summary["ood"]["clinical"]["age"]["outside"] is False
    bad = [str(a) for a in argv]
    bad[bad.index("models:/hemexp-2D-ice@champion")] = "models:/hemexp-2D-ice@nonexistent"
    assert main(bad) == 2
    assert "not found in the model registry" in capsys.readouterr().err


def test_pyfunc_loads_and_predicts_from_the_registry(released):
    import mlflow

    _, _, _, raw, cfg = released
    mlflow.set_tracking_uri(cfg["tracking"]["uri"])
    mlflow.set_registry_uri(cfg["tracking"]["uri"])
    model = mlflow.pyfunc.load_model("models:/hemexp-2D-ice@candidate")
    df = pd.DataFrame([{"ct": str(raw / "ct.nii.gz"), "iph": str(raw / "iph.nii.gz"), "ivh": str(raw / "ivh.nii.gz"),
                        **{k: float(v) for k, v in CLINICAL.items()}, "flag": "1", "patient_id": "P1"}])
    out = model.predict(df, params={"n_samples": 2, "steps": 2})
    assert list(out["patient_id"]) == ["P1"] and out["iph_median_ml"].iloc[0] >= 0
    assert out["p_expansion"].between(0, 1).all()
