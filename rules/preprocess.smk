# Preprocessing: ingest + skull strip -> (template) -> register + resample/crop + QC -> slice shard.
# One job per patient and step; a job's inputs are that patient's raw files only (never the whole
# manifest of a manifest cohort), so adding a patient runs only that patient's jobs. Manifest values
# the commands read (split, site, clinical, expansion) enter as a per-patient row hash in `params`,
# so editing one row reruns only that patient.
from hemexp.cohort.manifest import manifest_row_hashes
from hemexp.preprocess.template import template_info_path, template_paths, template_patients

PATIENT_RE = PATIENT_ID_PATTERN  # a per-ID alternation makes DAG building quadratic in cohort size
TEMPLATE, TEMPLATE_MASK = (str(p) if p else None for p in template_paths(config))
TEMPLATE_INPUTS = [p for p in (TEMPLATE, TEMPLATE_MASK) if p]
SYNTHETIC = config["cohort"]["source"] == "synthetic"
# Manifest cohorts: patient -> hash of its manifest row (a params rerun trigger for that patient only).
# The synthetic cohort's manifest is instead an input (rule synth rewrites the whole cohort at once).
ROW_HASH = {} if SYNTHETIC else manifest_row_hashes(MANIFEST)
# A manifest cohort's missing raw file is left out: that patient's ingest fails on it (failure record),
# the others run, instead of the whole DAG failing to build (Patient.raw_files).
RAW_INPUTS = {
    pid: p.raw_files(present_only=not SYNTHETIC) + ([MANIFEST] if SYNTHETIC else [])
    for pid, p in PATIENTS.items()
}


rule ingest:
    """Load one patient's baseline/follow-up CT and masks (canonical HU), check them, skull-strip."""
    input:
        lambda w: RAW_INPUTS[w.patient],
    output:
        directory(ingested_dir("{patient}")),
    log:
        str(L.log("ingest", "{patient}")),
    benchmark:
        str(L.benchmark("ingest", L.log("ingest", "{patient}")))
    wildcard_constraints:
        patient=PATIENT_RE,
    conda:
        HEMEXP_ENV
    resources:
        **R("ingest"),
    params:
        strip=[config["preprocess"]["skullstrip"], config["preprocess"]["brain_volume_ml"]],
        labels=config["cohort"]["mask_labels"],
        config=RESOLVED_CONFIG,
    shell:
        "hemexp ingest {wildcards.patient} --config {params.config} > {log} 2>&1"


if not config["preprocess"]["template"]:
    # Candidates = first template_n_patients + 1 sorted training IDs. The inputs are their raw files, not
    # their ingest outputs: the job ingests each candidate itself and skips a bad one, so under
    # --keep-going one bad template patient fails only itself (a job fed by a failed job never runs).
    TEMPLATE_PATIENTS = template_patients(TRAIN, config["preprocess"]["template_n_patients"])
    if not TEMPLATE_PATIENTS:
        raise ValueError("preprocess.template is null but the cohort has no training patients to build one")

    rule build_template:
        """CT template from the first preprocess.template_n_patients usable training baselines (sorted IDs)."""
        input:
            sorted({f for p in TEMPLATE_PATIENTS for f in RAW_INPUTS[p]}),
        output:
            template=TEMPLATE,
            mask=TEMPLATE_MASK,
            info=str(template_info_path(config)),
        log:
            str(L.log("build_template")),
        benchmark:
            str(L.benchmark("build_template", L.log("build_template")))
        conda:
            HEMEXP_ENV
        resources:
            **R("build_template"),
        params:
            patients=" ".join(TEMPLATE_PATIENTS),
            strip=[config["preprocess"]["skullstrip"], config["preprocess"]["brain_volume_ml"]],
            labels=config["cohort"]["mask_labels"],
            rows=[ROW_HASH.get(p, "") for p in TEMPLATE_PATIENTS],
            reg=config["preprocess"]["registration_mm"],
            seed=config["seed"],
            config=RESOLVED_CONFIG,
        shell:
            "hemexp build-template --patients {params.patients} --config {params.config} > {log} 2>&1"


rule preprocess:
    """Register (baseline rigid to template, follow-up rigid+affine to baseline), resample/crop to the
    model grid, QC figure and summary.json for one patient."""
    input:
        ingested_dir("{patient}"),
        TEMPLATE_INPUTS,
    output:
        directory(preprocessed_dir("{patient}")),
    log:
        str(L.log("preprocess", "{patient}")),
    benchmark:
        str(L.benchmark("preprocess", L.log("preprocess", "{patient}")))
    wildcard_constraints:
        patient=PATIENT_RE,
    conda:
        HEMEXP_ENV
    resources:
        **R("preprocess"),
    params:
        cfg=cfg_hash("preprocess"),
        seed=config["seed"],
        row=lambda w: ROW_HASH.get(w.patient, ""),
        config=RESOLVED_CONFIG,
    shell:
        "hemexp preprocess {wildcards.patient} --config {params.config} > {log} 2>&1"


rule shard:
    """Axial slices with IPH (+ context rows) of one preprocessed patient -> Parquet shard."""
    input:
        preprocessed_dir("{patient}"),
    output:
        str(L.shard("{patient}")),
    log:
        str(L.log("shard", "{patient}")),
    benchmark:
        str(L.benchmark("shard", L.log("shard", "{patient}")))
    wildcard_constraints:
        patient=PATIENT_RE,
    conda:
        HEMEXP_ENV
    resources:
        **R("shard"),
    params:
        cfg=cfg_hash("shards"),  # an edited manifest row reruns preprocess, whose new folder reruns this
        config=RESOLVED_CONFIG,
    shell:
        "hemexp shard {wildcards.patient} --config {params.config} > {log} 2>&1"


SHARDS = [str(L.shard(p)) for p in sorted(PATIENTS)]
FINAL_TARGETS += SHARDS + [preprocessed_dir(p) for p in sorted(PATIENTS)]
