# Preprocessing: ingest + skull strip -> (template) -> register + resample/crop + QC -> slice shard.
# One job per patient and step; a job's inputs are that patient's raw files only (never the whole
# manifest of a manifest cohort), so adding a patient runs only that patient's jobs. Manifest values
# the commands read (split, site, clinical, expansion) enter as a per-patient row hash in `params`,
# so editing one row reruns only that patient.
import re

from hemexp.preprocess.pipeline import manifest_row_hashes
from hemexp.preprocess.template import template_paths, template_patients

PATIENT_RE = PATIENT_ID_PATTERN  # a per-ID alternation makes DAG building quadratic in cohort size
INGEST_FILES = ["bl_ct.nii.gz", "fu_ct.nii.gz", "bl_iph.nii.gz", "bl_ivh.nii.gz", "fu_iph.nii.gz",
                "fu_ivh.nii.gz", "brain_bl.nii.gz", "brain_fu.nii.gz", "ingest.json"]
PREPROCESSED_FILES = ["bl_ct.nii.gz", "bl_iph.nii.gz", "bl_ivh.nii.gz", "fu_ct.nii.gz", "fu_iph.nii.gz",
                      "fu_ivh.nii.gz", "brain_bl.nii.gz", "brain_fu.nii.gz", "transforms/bl_to_template.mat",
                      "transforms/fu_to_bl.mat", "transforms/model_grid.json", "transforms/native_grid.json",
                      "qc.png", "summary.json"]
TEMPLATE, TEMPLATE_MASK = (str(p) if p else None for p in template_paths(config))
TEMPLATE_INPUTS = [p for p in (TEMPLATE, TEMPLATE_MASK) if p]
SYNTHETIC = config["cohort"]["source"] == "synthetic"
# Manifest cohorts: patient -> hash of its manifest row (a params rerun trigger for that patient only).
# The synthetic cohort's manifest is instead an input (rule synth rewrites the whole cohort at once).
ROW_HASH = {} if SYNTHETIC else manifest_row_hashes(MANIFEST)
RAW_INPUTS = {pid: sorted(set(p.inputs.values())) + ([MANIFEST] if SYNTHETIC else []) for pid, p in PATIENTS.items()}


rule ingest:
    """Load one patient's baseline/follow-up CT and masks (canonical HU), check them, skull-strip."""
    input:
        lambda w: RAW_INPUTS[w.patient],
    output:
        [f"{RESULTS}/ingested/{{patient}}/{f}" for f in INGEST_FILES],
    params:
        strip=[config["preprocess"]["skullstrip"], config["preprocess"]["brain_volume_ml"]],
        labels=config["cohort"]["mask_labels"],
        config=RESOLVED_CONFIG,
    wildcard_constraints:
        patient=PATIENT_RE,
    resources:
        **R("ingest"),
    conda:
        HEMEXP_ENV
    log:
        f"{RESULTS}/logs/ingest/{{patient}}.log",
    shell:
        "hemexp ingest {wildcards.patient} --config {params.config} > {log} 2>&1"


if not config["preprocess"]["template"]:
    TEMPLATE_PATIENTS = template_patients(TRAIN, config["preprocess"]["template_n_patients"])
    if not TEMPLATE_PATIENTS:
        raise ValueError("preprocess.template is null but the cohort has no training patients to build one")

    rule build_template:
        """CT template from the first preprocess.template_n_patients training baselines (sorted IDs)."""
        input:
            [f"{RESULTS}/ingested/{p}/{f}" for p in TEMPLATE_PATIENTS for f in ("bl_ct.nii.gz", "brain_bl.nii.gz")],
        output:
            template=TEMPLATE,
            mask=TEMPLATE_MASK,
        params:
            patients=" ".join(TEMPLATE_PATIENTS),
            reg=config["preprocess"]["registration_mm"],
            seed=config["seed"],
            config=RESOLVED_CONFIG,
        resources:
            **R("build_template"),
        conda:
            HEMEXP_ENV
        log:
            f"{RESULTS}/logs/build_template.log",
        shell:
            "hemexp build-template --patients {params.patients} --config {params.config} > {log} 2>&1"


rule preprocess:
    """Register (baseline rigid to template, follow-up rigid+affine to baseline), resample/crop to the
    model grid, QC figure and summary.json for one patient."""
    input:
        [f"{RESULTS}/ingested/{{patient}}/{f}" for f in INGEST_FILES],
        TEMPLATE_INPUTS,
    output:
        [f"{RESULTS}/preprocessed/{{patient}}/{f}" for f in PREPROCESSED_FILES],
    params:
        cfg=cfg_hash("preprocess"),
        seed=config["seed"],
        row=lambda w: ROW_HASH.get(w.patient, ""),
        config=RESOLVED_CONFIG,
    wildcard_constraints:
        patient=PATIENT_RE,
    resources:
        **R("preprocess"),
    conda:
        HEMEXP_ENV
    log:
        f"{RESULTS}/logs/preprocess/{{patient}}.log",
    shell:
        "hemexp preprocess {wildcards.patient} --config {params.config} > {log} 2>&1"


rule shard:
    """Axial slices with IPH (+ context rows) of one preprocessed patient -> Parquet shard."""
    input:
        [f"{RESULTS}/preprocessed/{{patient}}/{f}" for f in PREPROCESSED_FILES],
    output:
        f"{RESULTS}/shards/{{patient}}.parquet",
    params:
        cfg=cfg_hash("shards"),
        row=lambda w: ROW_HASH.get(w.patient, ""),
        config=RESOLVED_CONFIG,
    wildcard_constraints:
        patient=PATIENT_RE,
    resources:
        **R("shard"),
    conda:
        HEMEXP_ENV
    log:
        f"{RESULTS}/logs/shard/{{patient}}.log",
    shell:
        "hemexp shard {wildcards.patient} --config {params.config} > {log} 2>&1"


SHARDS = [f"{RESULTS}/shards/{p}.parquet" for p in sorted(PATIENTS)]
SUMMARIES = [f"{RESULTS}/preprocessed/{p}/summary.json" for p in sorted(PATIENTS)]
FINAL_TARGETS += SHARDS + SUMMARIES
