# HemExp workflow: raw DICOM/NIfTI -> preprocessing -> slice shards -> multi-head VAE -> latents ->
# conditional latent diffusion of follow-up progression -> samples, maps, metrics and the report.
# Rules are thin: each calls one `hemexp <subcommand>`; the logic lives in the `hemexp` package
# (rules/<stage>.smk -> hemexp/<stage>/cli.py), and every path comes from hemexp.core.layout.
from snakemake.utils import min_version

from hemexp.core.commands import exit_on_usage_error
from hemexp.core.config import check_workflow_config_files, validate_config
from hemexp.workflow.report import build_report

min_version("9.0")

# A bad config or manifest stops the workflow here with one message naming the file and the problem
# (exit 2), never a Python error location: the config files (a YAML error, a repeated key), then the
# merged config (schema and cross-key rules), then the cohort (rules/common.smk).
with exit_on_usage_error("hemexp workflow"):
    check_workflow_config_files("config/config.yaml", workflow.overwrite_configfiles)


configfile: "config/config.yaml"


report: "report/workflow.rst"


with exit_on_usage_error("hemexp workflow"):
    validate_config(config, source="workflow config")  # every problem at once, before any job runs


include: "rules/common.smk"
include: "rules/workflow.smk"
include: "rules/cohort.smk"
include: "rules/preprocess.smk"
include: "rules/vae.smk"
include: "rules/diffusion.smk"
include: "rules/sampling.smk"
include: "rules/evaluation.smk"
include: "rules/baselines.smk"
include: "rules/release.smk"


rule all:
    default_target: True
    input:
        lambda wildcards: FINAL_TARGETS,


onsuccess:
    shell(f"hemexp failures --results {RESULTS}")
    shell(f"hemexp rule-times --results {RESULTS}")
    build_report(
        workflow, str(L.report)
    )  # <results>/report.html after a full run (hemexp.workflow.report)


onerror:
    shell(f"hemexp failures --results {RESULTS}")
    shell(f"hemexp rule-times --results {RESULTS}")
