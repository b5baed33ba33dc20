"""What the Snakefile needs at parse time: the patient table, per-rule resources, target lists.

Kept in the package (not the Snakefile) so it is importable and tested, and so building the DAG for
thousands of patients costs one manifest read and no filesystem scans.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hemexp.cohort.manifest import IMAGE_COLUMNS, read_manifest
from hemexp.core.errors import ManifestError
from hemexp.core.ids import PATIENT_ID_PATTERN
from hemexp.core.layout import raw_dir

# PATIENT_ID_PATTERN is the wildcard constraint for a patient ID: exactly the IDs the manifest check
# accepts (ASCII letters, digits, '-' and '_', not first '-'; hemexp.core.ids). Prefer it to an
# alternation of every ID ("A001|A002|..."): Snakemake inlines a constraint into each output pattern,
# so an alternation makes every match scan the whole cohort and building the DAG grows with the
# square of the number of patients (docs/orchestration.md, Scale).
__all__ = ["PATIENT_ID_PATTERN", "Patient", "patients", "synthetic_inputs", "synthetic_patient_ids",
           "workflow_patients"]


@dataclass(frozen=True)
class Patient:
    """One patient as the workflow sees it; ``inputs`` are raw image paths keyed by manifest column."""

    patient_id: str
    site: str
    split: str
    inputs: dict[str, str]

    def raw_files(self, present_only: bool = False) -> list[str]:
        """The raw image files (sorted, each once). ``present_only``: only those that exist now: a
        manifest cohort's rule ``ingest`` declares these, so a missing file fails that patient's own
        job (with a failure record naming it) instead of the whole DAG (a missing input)."""
        files = sorted(set(self.inputs.values()))
        return [f for f in files if os.path.exists(f)] if present_only else files


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


def patients(cfg: dict[str, Any], check_files: bool = False) -> list[Patient]:
    """The cohort, sorted by ID: from the config (synthetic) or the manifest (validated, every bad row).

    Raw files are not checked unless ``check_files``: a patient whose file is missing still has its
    jobs, and fails in its own ``ingest`` (recorded in ``qc/failures.tsv``) while the others run;
    ``hemexp validate-manifest`` (rule validate_manifest) reports every missing file by row.
    """
    if cfg["cohort"]["source"] == "synthetic":
        return [Patient(pid, site, split, synthetic_inputs(cfg, pid)) for pid, site, split in synthetic_patient_ids(cfg)]
    df = read_manifest(cfg["cohort"]["manifest"], check_files=check_files)
    return [
        Patient(r.patient_id, r.site, r.split, {c: getattr(r, c) for c in IMAGE_COLUMNS})
        for r in df.itertuples(index=False)
    ]


def workflow_patients(cfg: dict[str, Any]) -> list[Patient]:
    """:func:`patients` for the workflow's DAG, which also needs training patients: every model and
    the built template are fitted on them. Without any, :class:`ManifestError` says so (unless
    ``freeze_models`` keeps existing models and ``preprocess.template`` is given)."""
    cohort = patients(cfg)
    if cfg["cohort"]["source"] == "synthetic":  # the config rules guarantee a training site
        return cohort
    manifest = cfg["cohort"]["manifest"]
    if not any(p.split == "train" for p in cohort):
        needs = []
        if not cfg["freeze_models"]:
            needs.append("the models are trained on them (or set freeze_models: true to keep existing ones)")
        if not cfg["preprocess"]["template"]:
            needs.append("the CT template is built from their baselines (or set preprocess.template)")
        if needs:
            raise ManifestError(manifest, [f"no patient has split 'train' ({len(cohort)} test patient(s)): "
                                           + "; ".join(needs)])
    return cohort
