"""What the Snakefile needs at parse time: the patient table, per-rule resources, target lists.

Kept in the package (not the Snakefile) so it is importable and tested, and so building the DAG for
thousands of patients costs one manifest read and no filesystem scans.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hemexp.cohort import IMAGE_COLUMNS, read_manifest

# Wildcard constraint for a patient ID: exactly the IDs the manifest check accepts (letters, digits,
# '-' and '_'). Prefer it to an alternation of every ID ("A001|A002|..."): Snakemake inlines a
# constraint into each output pattern, so an alternation makes every match scan the whole cohort and
# building the DAG grows with the square of the number of patients (docs/orchestration.md, Scale).
PATIENT_ID_PATTERN = r"[\w-]+"


@dataclass(frozen=True)
class Patient:
    """One patient as the workflow sees it; ``inputs`` are raw image paths keyed by manifest column."""

    patient_id: str
    site: str
    split: str
    inputs: dict[str, str]


def synthetic_patient_ids(cfg: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(patient_id, site, split) of the synthetic cohort, derived from config alone (no I/O).

    IDs are ``<site><index:03d>``; a site listed in ``test_sites`` is the held-out test site.
    """
    syn = cfg["cohort"]["synthetic"]
    out = []
    for site, count in syn["sites"].items():
        split = "test" if site in syn["test_sites"] else "train"
        out += [(f"{site}{i:03d}", site, split) for i in range(1, count + 1)]
    return out


def raw_dir(cfg: dict[str, Any]) -> Path:
    """Where ``hemexp synth`` writes the synthetic cohort (raw DICOM/NIfTI + manifest)."""
    return Path(cfg["results_dir"]) / "raw"


def synthetic_manifest_path(cfg: dict[str, Any]) -> Path:
    return raw_dir(cfg) / "manifest.tsv"


def synthetic_inputs(cfg: dict[str, Any], patient_id: str) -> dict[str, str]:
    """Raw file paths the synthetic cohort writes for one patient (the manifest points at these)."""
    base = raw_dir(cfg) / patient_id
    fmt = "dicom" if "dicom" in cfg["cohort"]["synthetic"]["formats"] else "nifti"
    ct = {"dicom": "{}_ct", "nifti": "{}_ct.nii.gz"}[fmt]
    return {
        "baseline_ct": str(base / ct.format("baseline")),
        "followup_ct": str(base / ct.format("followup")),
        "baseline_iph": str(base / "baseline_iph.nii.gz"),
        "baseline_ivh": str(base / "baseline_ivh.nii.gz"),
        "followup_iph": str(base / "followup_iph.nii.gz"),
        "followup_ivh": str(base / "followup_ivh.nii.gz"),
    }


def patients(cfg: dict[str, Any]) -> list[Patient]:
    """The cohort, sorted by ID: from the config (synthetic) or the manifest (validated, every bad row)."""
    if cfg["cohort"]["source"] == "synthetic":
        return [Patient(pid, site, split, synthetic_inputs(cfg, pid)) for pid, site, split in synthetic_patient_ids(cfg)]
    df = read_manifest(cfg["cohort"]["manifest"])
    return [
        Patient(r.patient_id, r.site, r.split, {c: getattr(r, c) for c in IMAGE_COLUMNS})
        for r in df.itertuples(index=False)
    ]


def manifest_path(cfg: dict[str, Any]) -> Path:
    """The manifest every stage reads: the user's, or the one ``hemexp synth`` writes."""
    if cfg["cohort"]["source"] == "synthetic":
        return synthetic_manifest_path(cfg)
    return Path(cfg["cohort"]["manifest"])


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
