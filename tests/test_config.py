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


@pytest.mark.parametrize("overlays", [["validity.yaml"], ["validity.yaml", "validity_law_b.yaml"],
                                      ["validity.yaml", "validity_gpu.yaml"]])
def test_validity_overlays_validate_and_keep_their_own_results_folder(overlays):
    """The validity study's overlays merge onto config.yaml (leaf by leaf, as Snakemake merges them),
    validate, study only configured variants and write under a folder of their own."""
    from hemexp.tracking.runs import flatten

    merged: dict = {}
    for name in overlays:
        merged.update(flatten(yaml.safe_load((REPO_ROOT / "config" / name).read_text())))
    cfg = load_config(DEFAULT_CONFIG, merged)
    syn = cfg["cohort"]["synthetic"]
    assert sum(syn["sites"].values()) == syn["n_patients"] >= 200
    assert cfg["results_dir"].startswith("results_validity") and cfg["sampling"]["n_samples"] >= 20
    assert set(cfg["evaluation"]["validity"]["variants"]) <= set(cfg["diffusion"]["variants"])
    assert not syn["calibrate_noise"]  # the oracle is the law only if the law's noise is left alone


def test_validity_variants_must_be_configured(cfg):
    cfg["evaluation"]["validity"]["variants"] = ["2D-nope"]
    assert "evaluation.validity.variants" in _errors(cfg)


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


# ---------------------------------------------------------------------------- cross-key rules
# Each rule below used to be raised somewhere else (a rules/*.smk file at workflow start, or a command
# partway through a run); now the validator reports all of them at once, naming the key.
def test_perturbation_variant_needs_clinical_conditioning(cfg):  # was rules/evaluation.smk
    cfg["evaluation"]["perturbation_variant"] = "2D-i"
    msg = _errors(cfg)
    assert "evaluation.perturbation_variant: '2D-i' has no clinical conditioning" in msg


def test_flag_source_passes_name_sampled_flag_conditioned_variants(cfg):  # was evaluation/collect.py
    cfg["sampling"]["variants"] = ["2D-ice", "2D-i"]
    cfg["evaluation"]["flag_source_passes"] = {"classifier": ["2D-i", "2.5D3-ice"]}
    msg = _errors(cfg)
    assert "evaluation.flag_source_passes.classifier: variant '2D-i' is not flag-conditioned" in msg
    assert "evaluation.flag_source_passes.classifier: '2.5D3-ice' is not a sampled variant" in msg
    cfg["evaluation"]["flag_source_passes"] = {"oracle": ["2D-ice"]}  # same source as the main pass: allowed
    validate_config(cfg)


def test_synthetic_cohort_consistency(cfg):  # was cohort/synth/cohort.py::check_config
    syn = cfg["cohort"]["synthetic"]
    syn["test_sites"] = sorted(syn["sites"])  # every site held out: nothing to train on (or build a template from)
    syn["slice_thickness_mm"] = [5.0, 2.5]
    msg = _errors(cfg)
    assert "cohort.synthetic.test_sites leaves no training site" in msg
    assert "cohort.synthetic.slice_thickness_mm: range must be [low, high]" in msg and "2 problem(s)" in msg


def test_vae_resolutions_fit_the_latent_factor(cfg):  # was vae/train.py at training start
    cfg["vae"]["channels"] = [16, 32, 64]  # latent factor 4
    cfg["vae"]["resolutions"] = [[30, 10], [64, 10]]
    assert "vae.resolutions: sizes [30] are not divisible by the latent factor 4" in _errors(cfg)


def test_scenario_and_profile_names_differ(cfg):  # was evaluation/guidance/run.py at study start
    name = next(iter(cfg["evaluation"]["scenarios"]))
    cfg["evaluation"]["profiles"][name] = cfg["evaluation"]["profiles"]["stable"]
    assert f"evaluation.profiles: {[name]} also named in evaluation.scenarios" in _errors(cfg)
