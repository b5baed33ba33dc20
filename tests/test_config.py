"""Config schema: the shipped configs validate; bad ones fail with the key and allowed values named."""

import copy

import pytest
import yaml

from hemexp.core.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, load_config, validate_config


@pytest.fixture()
def cfg():
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_shipped_configs_validate(name):
    load_config(REPO_ROOT / "config" / name)


def test_cohort72_overlay_validates_on_top_of_the_default():
    """config/cohort72.yaml is a --configfile overlay: merged onto config.yaml it must still validate."""
    from hemexp.tracking.runs import flatten

    overlay = yaml.safe_load((REPO_ROOT / "config" / "cohort72.yaml").read_text())
    cfg = load_config(DEFAULT_CONFIG, flatten(overlay))  # leaf by leaf, as Snakemake merges --configfile
    assert sum(cfg["cohort"]["synthetic"]["sites"].values()) == cfg["cohort"]["synthetic"]["n_patients"] == 78


def _errors(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    return str(info.value)


def test_enum_error_names_key_and_allowed_values(cfg):
    cfg["cohort"]["source"] = "excel"
    msg = _errors(cfg)
    assert "cohort.source" in msg and "'excel'" in msg and "'synthetic'" in msg and "'manifest'" in msg


def test_unknown_key_is_named(cfg):
    cfg["vae"]["chanels"] = [1, 2]
    msg = _errors(cfg)
    assert "vae" in msg and "chanels" in msg and "allowed keys" in msg


def test_wrong_type_and_missing_section(cfg):
    bad = copy.deepcopy(cfg)
    bad["sampling"]["n_samples"] = "five"
    del bad["tracking"]
    msg = _errors(bad)
    assert "sampling.n_samples" in msg and "tracking" in msg
    assert "2 problem(s)" in msg  # every error reported at once


def test_out_of_range_value(cfg):
    cfg["diffusion"]["clinical_dropout"] = 1.5
    assert "diffusion.clinical_dropout" in _errors(cfg)


def test_bad_variant_spec(cfg):
    cfg["diffusion"]["variants"]["3D-x"] = {"context": 7, "conditioning": "ice"}
    msg = _errors(cfg)
    assert "diffusion.variants.3D-x.context" in msg and "allowed values: 1, 3, 5" in msg


def test_cross_section_rules(cfg):
    cfg["cohort"]["source"] = "manifest"
    cfg["cohort"]["manifest"] = None
    cfg["sampling"]["variants"] = ["nope"]
    msg = _errors(cfg)
    assert "cohort.manifest: required" in msg and "sampling.variants: 'nope'" in msg


def test_overrides_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="sampling.guidance_scale"):
        load_config(None, overrides={"sampling.guidance_scale": -1})
