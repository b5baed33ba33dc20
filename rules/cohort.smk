# Cohort: the synthetic ground-truth cohort (when configured), manifest validation, Table 1.

if config["cohort"]["source"] == "synthetic":

    rule synth:
        """Simulate the synthetic ICH cohort: raw DICOM/NIfTI, manifest, clinical table, truth.json."""
        output:
            manifest=MANIFEST,
            clinical=f"{RESULTS}/raw/clinical.tsv",
            truth=f"{RESULTS}/raw/truth.json",
            scans=[directory(p.inputs[c]) if not p.inputs[c].endswith(".gz") else p.inputs[c]
                   for p in PATIENTS.values() for c in ("baseline_ct", "followup_ct")],
            masks=[p.inputs[c] for p in PATIENTS.values()
                   for c in ("baseline_iph", "baseline_ivh", "followup_iph", "followup_ivh")],
        params:
            cfg=cfg_hash("cohort"),
            config=RESOLVED_CONFIG,
        resources:
            **R("synth"),
        conda:
            HEMEXP_ENV
        log:
            f"{RESULTS}/logs/synth.log",
        shell:
            "hemexp synth --config {params.config} > {log} 2>&1"


rule validate_manifest:
    """Check every manifest row (IDs, splits, files, clinical ranges) and record the cohort's split."""
    input:
        MANIFEST,
    output:
        f"{RESULTS}/cohort/manifest_check.json",
    resources:
        **R("validate_manifest"),
    conda:
        HEMEXP_ENV
    log:
        f"{RESULTS}/logs/validate_manifest.log",
    shell:
        "hemexp validate-manifest {input} --out {output} > {log} 2>&1"


rule cohort_table:
    """Table 1 of the paper for this cohort: median [IQR] or % per split."""
    input:
        manifest=MANIFEST,
        check=rules.validate_manifest.output,
    output:
        csv=f"{RESULTS}/cohort/table1.csv",
        md=report(f"{RESULTS}/cohort/table1.md", category="1. Cohort", caption="../report/cohort.rst"),
    params:
        config=RESOLVED_CONFIG,
    resources:
        **R("cohort_table"),
    conda:
        HEMEXP_ENV
    log:
        f"{RESULTS}/logs/cohort_table.log",
    shell:
        "hemexp cohort-table {input.manifest} --config {params.config} --csv {output.csv} --md {output.md} > {log} 2>&1"


FINAL_TARGETS += [rules.cohort_table.output.csv, rules.cohort_table.output.md]
