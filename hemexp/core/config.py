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
    """A configuration that does not satisfy the schema; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = errors
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
    validator = jsonschema.Draft202012Validator(config_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    messages = [_describe(e) for e in errors]
    if not messages:
        messages = _cross_checks(cfg)
    if messages:
        raise ConfigError(messages, source)


def _cross_checks(cfg: dict[str, Any]) -> list[str]:
    """Rules one JSON schema cannot express: references between keys and sections.

    This is the only place such rules live: the workflow validates the config before building its
    DAG, so a rule here fails at start, all problems at once, instead of in a rules file (one at a
    time) or in a command hours into a run. Each message starts with the key to fix.
    """
    return [*_cohort_rules(cfg["cohort"]), *_variant_rules(cfg), *_evaluation_rules(cfg), *_vae_rules(cfg["vae"])]


def _cohort_rules(cohort: dict[str, Any]) -> list[str]:
    problems = []
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
    return problems


def _evaluation_rules(cfg: dict[str, Any]) -> list[str]:
    ev = cfg["evaluation"]
    clash = sorted(set(ev.get("scenarios") or {}) & set(ev.get("profiles") or {}))
    if clash:  # both become rows of one perturbation table, keyed by name
        return [f"evaluation.profiles: {clash} also named in evaluation.scenarios (names must differ)"]
    return []


def _vae_rules(vae: dict[str, Any]) -> list[str]:
    factor = 2 ** (len(vae["channels"]) - 1)  # the VAE halves the slice once per level after the first
    bad = [int(size) for size, _ in vae["resolutions"] if int(size) % factor]
    if bad:
        return [f"vae.resolutions: sizes {bad} are not divisible by the latent factor {factor} "
                f"(2 per vae.channels level after the first)"]
    return []


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read YAML, apply dotted-key ``overrides`` and validate; the returned dict is the resolved config."""
    path = Path(path) if path else DEFAULT_CONFIG
    with open(path) as fh:
        cfg = yaml.safe_load(fh) or {}
    for dotted, value in (overrides or {}).items():
        set_dotted(cfg, dotted, value)
    validate_config(cfg, source=str(path))
    return cfg


def set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating intermediate dicts (for ``--set`` style overrides)."""
    node = cfg
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
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

    @property
    def uses_clinical(self) -> bool:
        return "c" in self.conditioning

    @property
    def uses_flag(self) -> bool:
        return "e" in self.conditioning


def variants(cfg: dict[str, Any]) -> dict[str, Variant]:
    """Resolve the configured diffusion variants into :class:`Variant` objects, keyed by name."""
    return {
        name: Variant(name=name, context=int(spec["context"]), conditioning=spec["conditioning"])
        for name, spec in cfg["diffusion"]["variants"].items()
    }


def sampled_variants(cfg: dict[str, Any]) -> list[str]:
    """Variants that the sampling and evaluation stages run (``sampling.variants`` or all)."""
    return list(cfg["sampling"].get("variants") or cfg["diffusion"]["variants"])


def resolved_copy(cfg: dict[str, Any]) -> dict[str, Any]:
    """A deep copy safe to mutate (tests and CLI overrides)."""
    return copy.deepcopy(cfg)
