# Cohort: the synthetic ground-truth cohort (when configured), manifest validation, Table 1.

if config["cohort"]["source"] == "synthetic":

    rule synth:
        """Simulate the synthetic ICH cohort: raw DICOM/NIfTI, manifest, clinical table, truth.json."""
        output:
            manifest=MANIFEST,
            clinical=str(L.synthetic_clinical),
            truth=str(L.truth),
            scans=[
                directory(p.inputs[c]) if not p.inputs[c].endswith(".gz") else p.inputs[c]
                for p in PATIENTS.values()
                for c in ("baseline_ct", "followup_ct")
            ],
            masks=[
                p.inputs[c]
                for p in PATIENTS.values()
                for c in ("baseline_iph", "baseline_ivh", "followup_iph", "followup_ivh")
            ],
        log:
            str(L.log("synth")),
        benchmark:
            str(L.benchmark("synth", L.log("synth")))
        conda:
            HEMEXP_ENV
        resources:
            **R("synth"),
        params:
            cfg=cfg_hash("cohort"),
            config=RESOLVED_CONFIG,
        shell:
            "hemexp synth --config {params.config} > {log} 2>&1"


rule validate_manifest:
    """Check every manifest row (IDs, splits, files, clinical ranges) and record the cohort's split."""
    input:
        MANIFEST,
    output:
        str(L.manifest_check),
    log:
        str(L.log("validate_manifest")),
    benchmark:
        str(L.benchmark("validate_manifest", L.log("validate_manifest")))
    conda:
        HEMEXP_ENV
    resources:
        **R("validate_manifest"),
    shell:
        "hemexp validate-manifest {input} --out {output} > {log} 2>&1"


rule cohort_table:
    """Table 1 of the paper for this cohort: median [IQR] or % per split."""
    input:
        manifest=MANIFEST,
        check=rules.validate_manifest.output,
    output:
        csv=str(L.table1("csv")),
        md=report(str(L.table1("md")), category="1. Cohort", caption="../report/cohort.rst"),
    log:
        str(L.log("cohort_table")),
    benchmark:
        str(L.benchmark("cohort_table", L.log("cohort_table")))
    conda:
        HEMEXP_ENV
    resources:
        **R("cohort_table"),
    params:
        config=RESOLVED_CONFIG,
    shell:
        "hemexp cohort-table {input.manifest} --config {params.config} --csv {output.csv} --md {output.md} > {log} 2>&1"


FINAL_TARGETS += [rules.cohort_table.output.csv, rules.cohort_table.output.md]
