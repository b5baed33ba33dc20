"""Per-rule cluster resources from the config's ``resources:`` section (read by ``rules/common.smk``)."""

from __future__ import annotations

from typing import Any


def rule_resources(cfg: dict[str, Any], rule: str) -> dict[str, Any]:
    """SLURM resources for one rule: ``resources.<rule>`` over ``resources.default``.

    Returned keys are the ones snakemake-executor-plugin-slurm reads (``cpus_per_task``, ``mem_mb``,
    ``runtime`` in minutes, ``gpu`` -> ``--gpus=N``, ``gpu_model`` -> ``--gpus=<model>:N``,
    ``slurm_partition``, ``slurm_extra``); a local run ignores them. ``gpus: 0`` requests no GPU (the
    rule then runs on CPU), which is how a GPU-less cluster (or the test cluster) runs GPU rules.
    """
    spec = {**cfg["resources"]["default"], **cfg["resources"].get(rule, {})}
    out: dict[str, Any] = {"cpus_per_task": spec["cpus"], "mem_mb": spec["mem_mb"], "runtime": spec["runtime"]}
    if spec.get("gpus"):
        out["gpu"] = spec["gpus"]
        if spec.get("gpu_model"):
            out["gpu_model"] = spec["gpu_model"]
    for key in ("slurm_partition", "slurm_extra"):
        if key in spec:
            out[key] = spec[key]
    return out
