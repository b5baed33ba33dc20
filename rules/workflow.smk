# Workflow plumbing that belongs to no stage (hemexp/workflow/): the training-split indexes.


rule gather_index:
    """One family's files of every training patient, listed in one index file."""
    input:
        lambda wildcards: training_inputs(L, wildcards.family, TRAIN),
    output:
        str(L.index("{family}")),
    log:
        str(L.log("gather_index", "{family}")),
    benchmark:
        str(L.benchmark("gather_index", L.log("gather_index", "{family}")))
    wildcard_constraints:
        family=one_of(L.INDEXED),
    conda:
        HEMEXP_ENV
    resources:
        **R("gather_index"),
    params:
        config=RESOLVED_CONFIG,
    shell:
        "hemexp gather-index {wildcards.family} --config {params.config} > {log} 2>&1"
