"""Configuration loading and JSON-schema validation.

The schema is split into one file per top-level section (``hemexp/core/schema/<section>.json``) so each
pipeline stage owns the keys it reads. Validation collects *every* error and names the offending key
path and, for enumerations, the allowed values, because a cluster job that dies an hour in on a typo
is the costliest kind of error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"
SCHEMA_SECTIONS = (
    "core",
    "cohort",
    "preprocess",
    "shards",
    "vae",
    "latents",
    "diffusion",
    "sampling",
    "evaluation",
    "baselines",
    "nnunet",
    "tracking",
    "resources",
)


class ConfigError(ValueError):
    """A configuration that cannot be used (unreadable file, bad YAML, schema or cross-key rule);
    ``errors`` lists every problem found. One problem reads as one line: ``<source>: <problem>``."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = errors
        self.source = source
        if len(errors) == 1:
            super().__init__(f"{source}: {errors[0]}")
        else:
            super().__init__(f"{source}: {len(errors)} problem(s)\n  - " + "\n  - ".join(errors))


def _load_section_schema(name: str) -> dict[str, Any]:
    text = resources.files("hemexp.core.schema").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def config_schema() -> dict[str, Any]:
    """Assemble the full schema: ``core.json`` holds top-level scalars, every other file one section."""
    core = _load_section_schema("core")
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": False,
        "properties": dict(core["properties"]),
        "required": list(core.get("required", [])),
    }
    for name in SCHEMA_SECTIONS:
        if name == "core":
            continue
        schema["properties"][name] = _load_section_schema(name)
        schema["required"].append(name)
    return schema


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """Turn a jsonschema error into 'key: problem (allowed: ...)' that a user can act on."""
    key = _key_path(error)
    if error.validator == "enum":
        allowed = ", ".join(repr(v) for v in error.validator_value)
        return f"{key}: {error.instance!r} is not allowed (allowed values: {allowed})"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"{key}: unknown key(s) {extra} (allowed keys: {', '.join(allowed)})"
    if error.validator == "required":
        return f"{key}: {error.message}"
    if error.validator in ("oneOf", "anyOf"):
        options = [s.get("description") or s.get("enum") or s.get("type") for s in error.validator_value]
        return f"{key}: {error.instance!r} matches none of the allowed forms {options}"
    return f"{key}: {error.message}"


def validate_config(cfg: dict[str, Any], source: str = "config") -> None:
    """Raise :class:`ConfigError` listing every schema violation in ``cfg`` (and cross-key rules)."""
    if not isinstance(cfg, dict):
        raise ConfigError([_not_a_mapping(cfg)], source)
    validator = jsonschema.Draft202012Validator(config_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    messages = [_describe(e) for e in errors] + _non_finite(cfg)
    if not messages:
        messages = _cross_checks(cfg)
    if messages:
        raise ConfigError(messages, source)


def _not_a_mapping(value: Any) -> str:
    kind = "a list" if isinstance(value, list) else f"the {type(value).__name__} {value!r}"[:80]
    return (f"the top level must be a mapping of keys (results_dir: ..., cohort: ..., ...), got {kind}; "
            "start from config/config.yaml")


def _non_finite(node: Any, key: str = "") -> list[str]:
    """NaN and infinity pass every JSON-schema bound (each comparison is false), so name them here."""
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{key or '<top level>'}: {node!r} is not a finite number"]
    if isinstance(node, dict):
        return [m for k, v in node.items() for m in _non_finite(v, f"{key}.{k}" if key else str(k))]
    if isinstance(node, list):
        return [m for i, v in enumerate(node) for m in _non_finite(v, f"{key}.{i}")]
    return []


def _cross_checks(cfg: dict[str, Any]) -> list[str]:
    """Rules one JSON schema cannot express: references between keys and sections.

    This is the only place such rules live: the workflow validates the config before building its
    DAG, so a rule here fails at start, all problems at once, instead of in a rules file (one at a
    time) or in a command hours into a run. Each message starts with the key to fix.
    """
    return [*_cohort_rules(cfg["cohort"]), *_variant_rules(cfg), *_evaluation_rules(cfg), *_vae_rules(cfg["vae"]),
            *_preprocess_rules(cfg["preprocess"]), *_network_rules(cfg), *_sampling_rules(cfg)]


def _ordered(key: str, pair: list[float], strict: bool, unit: str = "") -> list[str]:
    """``key: [low, high]`` must not be reversed (nor, when ``strict``, of zero width)."""
    lo, hi = pair
    if lo > hi or (strict and lo == hi):
        need = "low < high" if strict else "low <= high"
        return [f"{key}: range must be [low, high] with {need}, got [{lo:g}, {hi:g}]{unit}"]
    return []


def _duplicates(key: str, values: list[Any]) -> list[str]:
    seen, twice = set(), []
    for v in values:
        if v in seen and v not in twice:
            twice.append(v)
        seen.add(v)
    return [f"{key}: {twice} listed more than once (each value gives one result row; list it once)"] if twice else []


def _cohort_rules(cohort: dict[str, Any]) -> list[str]:
    problems = _mask_label_rules(cohort)
    if cohort["source"] == "manifest" and not cohort.get("manifest"):
        problems.append("cohort.manifest: required when cohort.source is 'manifest'")
    if cohort["source"] != "synthetic":
        return problems
    # (cohort.synthetic.n_patients = sum of sites is checked by the synthesis itself: configs of small
    # test cohorts, below the schema's minimum n_patients, run every other stage on prepared data.)
    syn = cohort["synthetic"]
    sites = syn["sites"]
    unknown = sorted(set(syn["test_sites"]) - set(sites))
    if unknown:
        problems.append(f"cohort.synthetic.test_sites: {unknown} not among sites {sorted(sites)}")
    if not set(sites) - set(syn["test_sites"]):  # also: no training baselines for a preprocess.template: null
        problems.append("cohort.synthetic.test_sites leaves no training site")
    for key in ("slice_thickness_mm", "expander_fraction"):
        lo, hi = syn[key]
        if lo > hi:
            problems.append(f"cohort.synthetic.{key}: range must be [low, high], got [{lo}, {hi}]")
    return problems


def _mask_label_rules(cohort: dict[str, Any]) -> list[str]:
    labels = cohort["mask_labels"]
    if labels["iph"] == labels["ivh"]:
        return [f"cohort.mask_labels: iph and ivh are both {labels['iph']}; a label map needs a different "
                "value for each (e.g. {iph: 1, ivh: 2})"]
    return []


def _variant_rules(cfg: dict[str, Any]) -> list[str]:
    """Every variant named outside ``diffusion.variants`` must be one, with the conditioning its use needs."""
    problems = []
    known = cfg["diffusion"]["variants"]
    for name in cfg["sampling"].get("variants") or []:
        if name not in known:
            problems.append(f"sampling.variants: {name!r} is not a diffusion variant (allowed: {sorted(known)})")
    pv = cfg["evaluation"].get("perturbation_variant")
    if pv is not None and pv not in known:
        problems.append(f"evaluation.perturbation_variant: {pv!r} is not a diffusion variant (allowed: {sorted(known)})")
    elif pv is not None and "c" not in known[pv]["conditioning"]:
        problems.append(f"evaluation.perturbation_variant: {pv!r} has no clinical conditioning (conditioning "
                        "without 'c'), so perturbing clinical inputs cannot change its samples")
    sampled = set(cfg["sampling"].get("variants") or known)
    for source, names in (cfg["evaluation"].get("flag_source_passes") or {}).items():
        for name in names:
            if name not in sampled:
                problems.append(f"evaluation.flag_source_passes.{source}: {name!r} is not a sampled variant "
                                f"(sampled: {sorted(sampled)})")
            elif "e" not in known[name]["conditioning"]:
                problems.append(f"evaluation.flag_source_passes.{source}: variant {name!r} is not flag-conditioned "
                                "(conditioning without 'e'), a flag pass would repeat its main row")
    for name in (cfg["evaluation"].get("validity") or {}).get("variants") or []:
        if name not in known:
            problems.append(f"evaluation.validity.variants: {name!r} is not a diffusion variant (allowed: {sorted(known)})")
    for name, spec in known.items():
        if spec.get("flag_channel") and "e" not in spec["conditioning"]:
            problems.append(f"diffusion.variants.{name}.flag_channel: conditioning {spec['conditioning']!r} has no "
                            "expansion flag ('e') to feed as an input plane")
    return problems


def _evaluation_rules(cfg: dict[str, Any]) -> list[str]:
    ev = cfg["evaluation"]
    problems = [*_duplicates("evaluation.guidance_scales", ev["guidance_scales"]),
                *_duplicates("evaluation.interval_levels", ev["interval_levels"])]
    clash = sorted(set(ev.get("scenarios") or {}) & set(ev.get("profiles") or {}))
    if clash:  # both become rows of one perturbation table, keyed by name
        problems.append(f"evaluation.profiles: {clash} also named in evaluation.scenarios (names must differ)")
    rules = ev["validity"]["guidance_rules"]
    if rules[0] != cfg["sampling"]["guidance_rule"]:  # the calibration and effect rows are sampled under it
        problems.append(f"evaluation.validity.guidance_rules: the first rule ({rules[0]!r}) must be "
                        f"sampling.guidance_rule ({cfg['sampling']['guidance_rule']!r})")
    return problems


def _vae_factor(cfg: dict[str, Any]) -> int:
    return 2 ** (len(cfg["vae"]["channels"]) - 1)  # the VAE halves the slice once per level after the first


def _vae_rules(vae: dict[str, Any]) -> list[str]:
    factor = _vae_factor({"vae": vae})
    bad = [int(size) for size, _ in vae["resolutions"] if int(size) % factor]
    if bad:
        return [f"vae.resolutions: sizes {bad} are not divisible by the latent factor {factor} "
                f"(2 per vae.channels level after the first)"]
    return []


def _preprocess_rules(pre: dict[str, Any]) -> list[str]:
    problems = [*_ordered("preprocess.brain_volume_ml", pre["brain_volume_ml"], strict=True, unit=" mL"),
                *_ordered("preprocess.hu_window", pre["hu_window"], strict=True, unit=" HU")]
    if pre["template_mask"] and not pre["template"]:
        problems.append("preprocess.template_mask: set, but preprocess.template is null (the mask belongs to a "
                        "given template; set both, or neither to build one)")
    return problems


def _network_rules(cfg: dict[str, Any]) -> list[str]:
    """Shapes the VAE and the diffusion U-Net (MONAI) cannot build or cannot run on the model grid."""
    problems = []
    vae, unet = cfg["vae"], cfg["diffusion"]["unet"]
    for key, net in (("vae", vae), ("diffusion.unet", unet)):
        groups = net["norm_num_groups"]
        bad = [c for c in net["channels"] if c % groups]
        if bad:
            problems.append(f"{key}.channels: {bad} not divisible by {key}.norm_num_groups = {groups} (GroupNorm "
                            "splits every channel count into that many groups)")
    if len(unet["attention_levels"]) != len(unet["channels"]):
        problems.append(f"diffusion.unet.attention_levels: {len(unet['attention_levels'])} entries, but "
                        f"diffusion.unet.channels has {len(unet['channels'])} levels (one flag per level)")
    else:
        heads = unet["num_head_channels"]
        attended = [c for c, a in zip(unet["channels"], unet["attention_levels"], strict=True) if a]
        bad = sorted({c for c in [*attended, unet["channels"][-1]] if c % heads})  # the middle block attends too
        if bad:
            problems.append(f"diffusion.unet.num_head_channels: {heads} does not divide the attention channel "
                            f"count(s) {bad} (attention levels and the last level, which the middle block uses)")
    crop = [int(c) for c in cfg["preprocess"]["crop"]]
    factor = _vae_factor(cfg)
    if any(c % factor for c in crop):
        problems.append(f"preprocess.crop: {crop} is not divisible by the VAE's latent factor {factor} "
                        f"(2 ** (len(vae.channels) - 1)); use multiples of {factor}")
    else:
        latent = [c // factor for c in crop]
        unet_factor = 2 ** (len(unet["channels"]) - 1)
        if any(n % unet_factor for n in latent):
            problems.append(f"preprocess.crop: {crop} gives latents of {latent} pixels, not divisible by the "
                            f"diffusion U-Net's factor {unet_factor} (2 ** (len(diffusion.unet.channels) - 1)); "
                            f"use multiples of {factor * unet_factor}")
    return problems


def _sampling_rules(cfg: dict[str, Any]) -> list[str]:
    problems = _duplicates("sampling.variants", cfg["sampling"]["variants"] or [])
    steps, timesteps = cfg["sampling"]["ddim_steps"], cfg["diffusion"]["timesteps"]
    if steps > timesteps:
        problems.append(f"sampling.ddim_steps: {steps} exceeds diffusion.timesteps = {timesteps} (DDIM skips "
                        "through the training schedule; use at most that many steps)")
    if cfg["sampling"]["solver"] != "ddim" and cfg["sampling"]["eta"] != 0:
        problems.append(f"sampling.eta: {cfg['sampling']['eta']} needs solver ddim (solver "
                        f"{cfg['sampling']['solver']} is deterministic; set eta: 0)")
    return problems


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read YAML, apply dotted-key ``overrides`` and validate; the returned dict is the resolved config.

    Every way this can fail (a missing or unreadable file, a YAML syntax error, a repeated key, a top
    level that is not a mapping, a schema or cross-key rule) raises :class:`ConfigError`.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    cfg = read_config_file(path)
    for dotted, value in (overrides or {}).items():
        try:
            set_dotted(cfg, dotted, value)
        except TypeError as err:
            raise ConfigError([f"{dotted}: {err}"], source=str(path)) from None
    validate_config(cfg, source=str(path))
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping (PyYAML silently keeps the last:
    a second ``vae:`` section would replace the first without a word)."""


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise _DuplicateKeyError(
                None, None, f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}; YAML would "
                            "keep only the last): remove one", key_node.start_mark)
        if isinstance(key, (str, int, float, bool)):
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """One YAML config file as a dict, or :class:`ConfigError` in one line naming the file and, for
    syntax errors, the line and column."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise ConfigError(["is a folder, not a YAML file"], source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["file not found (give an existing YAML file; the default is config/config.yaml "
                           "of the repository)"], source) from None
    except UnicodeDecodeError as err:
        raise ConfigError([f"not UTF-8 text (byte {err.start}); save the config as UTF-8 YAML"], source) from None
    except OSError as err:
        raise ConfigError([f"cannot read: {err.strerror or err}"], source) from None
    try:
        cfg = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(p) for p in (err.context, err.problem) if p)
        fix = "" if isinstance(err, _DuplicateKeyError) else " (fix the YAML syntax there)"
        raise ConfigError([f"YAML error at {where}{what}{fix}"], source) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"YAML error: {' '.join(str(err).split())}"], source) from None
    if cfg is None:
        raise ConfigError(["the file is empty; start from config/config.yaml"], source)
    if not isinstance(cfg, dict):
        raise ConfigError([_not_a_mapping(cfg)], source)
    return cfg


def check_workflow_config_files(default: str | Path, given: list[str] | tuple[str, ...] = ()) -> None:
    """At workflow start, before Snakemake reads them: the Snakefile's ``configfile`` (``default``,
    optional when ``--configfile`` files are ``given``) and each given file, with
    :func:`read_config_file` (Snakemake's own reader keeps the last of a repeated key silently)."""
    paths = [Path(default)] if Path(default).exists() or not given else []
    for path in [*paths, *map(Path, given)]:
        read_config_file(path)


def set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating intermediate dicts (for ``--set`` style overrides)."""
    node = cfg
    *parents, leaf = dotted.split(".")
    for i, key in enumerate(parents):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise TypeError(f"{'.'.join(parents[: i + 1])} is {node!r}, not a mapping of keys")
    node[leaf] = value


def config_hash(cfg: dict[str, Any], sections: tuple[str, ...] | None = None) -> str:
    """Stable short hash of (a subset of) the config, used to tag runs and to key caches."""
    subset = {k: cfg[k] for k in sections} if sections else cfg
    blob = json.dumps(subset, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class Variant:
    """One diffusion model variant of the paper's ablation (e.g. ``2.5D3-ice``)."""

    name: str
    context: int  # number of axial slices fed in (1 = 2D, 3 or 5 = 2.5D)
    conditioning: str  # "i" imaging only, "ic" + clinical, "ice" + expansion flag
    cross_attention: bool = False  # clinical values and flag also as cross-attention tokens
    unit_delta: bool = False  # diffuse Δz divided by its training RMS (unit variance; model.delta_rms)
    scale_shift: bool = False  # condition by scale and shift after GroupNorm (AdaGN; diffusion.adagn)
    lesion_weight: float = 0.0  # extra loss weight near the baseline hematoma (training only; diffusion.lesion)
    flag_channel: bool = False  # the flag also as a constant input plane of the U-Net (ice only)
    max_steps: int | None = None  # this variant's training length (None: diffusion.max_steps)

    @property
    def uses_clinical(self) -> bool:
        return "c" in self.conditioning

    @property
    def uses_flag(self) -> bool:
        return "e" in self.conditioning


def variants(cfg: dict[str, Any]) -> dict[str, Variant]:
    """Resolve the configured diffusion variants into :class:`Variant` objects, keyed by name."""
    return {
        name: Variant(name=name, context=int(spec["context"]), conditioning=spec["conditioning"],
                      cross_attention=bool(spec.get("cross_attention", False)),
                      unit_delta=bool(spec.get("unit_delta", False)),
                      scale_shift=bool(spec.get("scale_shift", False)),
                      lesion_weight=float(spec.get("lesion_weight", 0.0)),
                      flag_channel=bool(spec.get("flag_channel", False)),
                      max_steps=int(spec["max_steps"]) if spec.get("max_steps") is not None else None)
        for name, spec in cfg["diffusion"]["variants"].items()
    }


def unknown_variant(cfg: dict[str, Any], variant: str, command: str) -> str | None:
    """The usage error of a ``command`` given a variant the config does not define (None when it does)."""
    if variant in variants(cfg):
        return None
    return f"hemexp {command}: unknown variant {variant!r} (configured: {sorted(variants(cfg))})"


def sampled_variants(cfg: dict[str, Any]) -> list[str]:
    """Variants that the sampling and evaluation stages run (``sampling.variants`` or all)."""
    return list(cfg["sampling"].get("variants") or cfg["diffusion"]["variants"])


def resolved_copy(cfg: dict[str, Any]) -> dict[str, Any]:
    """A deep copy safe to mutate (tests and CLI overrides)."""
    return copy.deepcopy(cfg)
