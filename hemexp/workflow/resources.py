"""Per-rule cluster resources from the config's ``resources:`` section (read by ``rules/common.smk``).

Every key under ``resources:`` is a rule name (or ``default``). Two kinds of fallback keep configs
short and old configs working:

* a rule that runs the same program as another rule takes that rule's entry unless it has its own
  (``perturb`` and ``sample_flag_source`` sample like ``sample``; ``nnunet_export_test`` exports like
  ``nnunet_export``);
* keys spelled the way of earlier releases (``train_nnunet`` for the rule ``nnunet_train``) are still
  read, with a deprecation message naming the new key.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# rule -> the rule whose resources it takes when it has no entry of its own
INHERITS = {"perturb": "sample", "sample_flag_source": "sample", "nnunet_export_test": "nnunet_export"}
# old key -> rule name (read as that rule's entry, with a deprecation message)
DEPRECATED_KEYS = {"plan_nnunet": "nnunet_plan", "train_nnunet": "nnunet_train", "predict_nnunet": "nnunet_predict"}
_warned: set[str] = set()


def rule_spec(resources: dict[str, Any], rule: str) -> dict[str, Any]:
    """The merged entry of one rule: default < inherited rule < deprecated key < the rule's own key."""
    spec = dict(resources["default"])
    parent = INHERITS.get(rule)
    if parent:
        spec.update(rule_spec_own(resources, parent))
    spec.update(rule_spec_own(resources, rule))
    return spec


def rule_spec_own(resources: dict[str, Any], rule: str) -> dict[str, Any]:
    """A rule's own entry, read under its name or under its deprecated key (the name wins)."""
    spec: dict[str, Any] = {}
    for old, new in DEPRECATED_KEYS.items():
        if new == rule and old in resources:
            if old not in _warned:
                _warned.add(old)
                log.warning("resources.%s is deprecated: name the entry after its rule, resources.%s", old, new)
            spec.update(resources[old])
    spec.update(resources.get(rule, {}))
    return spec


def rule_resources(cfg: dict[str, Any], rule: str) -> dict[str, Any]:
    """SLURM resources for one rule: ``resources.<rule>`` over ``resources.default``.

    Returned keys are the ones snakemake-executor-plugin-slurm reads (``cpus_per_task``, ``mem_mb``,
    ``runtime`` in minutes, ``gpu`` -> ``--gpus=N``, ``gpu_model`` -> ``--gpus=<model>:N``,
    ``slurm_partition``, ``slurm_extra``); a local run ignores them. ``gpus: 0`` requests no GPU (the
    rule then runs on CPU), which is how a GPU-less cluster (or the test cluster) runs GPU rules.
    """
    spec = rule_spec(cfg["resources"], rule)
    out: dict[str, Any] = {"cpus_per_task": spec["cpus"], "mem_mb": spec["mem_mb"], "runtime": spec["runtime"]}
    if spec.get("gpus"):
        out["gpu"] = spec["gpus"]
        if spec.get("gpu_model"):
            out["gpu_model"] = spec["gpu_model"]
    for key in ("slurm_partition", "slurm_extra"):
        if key in spec:
            out[key] = spec[key]
    return out
