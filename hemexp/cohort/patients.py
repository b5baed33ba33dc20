"""What the Snakefile needs at parse time: the patient table, per-rule resources, target lists.

Kept in the package (not the Snakefile) so it is importable and tested, and so building the DAG for
thousands of patients costs one manifest read and no filesystem scans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hemexp.cohort.manifest import IMAGE_COLUMNS, read_manifest
from hemexp.core.layout import raw_dir

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


