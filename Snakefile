# HemExp workflow: raw DICOM/NIfTI -> preprocessing -> slice shards -> multi-head VAE -> latents ->
# conditional latent diffusion of follow-up progression -> samples, maps, metrics and the report.
# Rules are thin: each calls one `hemexp <subcommand>`; the logic lives in the `hemexp` package.
from snakemake.utils import min_version

from hemexp.core.config import sampled_variants, validate_config, variants
from hemexp.core.layout import manifest_path
from hemexp.cohort.patients import patients

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


validate_config(config, source="workflow config")  # every problem at once, before any job runs

RESULTS = config["results_dir"]
PATIENTS = {p.patient_id: p for p in patients(config)}
TRAIN = sorted(pid for pid, p in PATIENTS.items() if p.split == "train")
TEST = sorted(pid for pid, p in PATIENTS.items() if p.split == "test")
VARIANTS = list(variants(config))
SAMPLED = sampled_variants(config)
MANIFEST = str(manifest_path(config))
FINAL_TARGETS = []  # each rules/*.smk appends the products that `snakemake` (rule all) must build


include: "rules/common.smk"
include: "rules/cohort.smk"
include: "rules/preprocess.smk"
include: "rules/vae.smk"
include: "rules/diffusion.smk"
include: "rules/sampling.smk"
include: "rules/evaluation.smk"
include: "rules/baselines.smk"


rule all:
    default_target: True
    input:
        lambda wildcards: FINAL_TARGETS,


onsuccess:
    shell(f"hemexp failures --results {RESULTS}")
    build_report(workflow, REPORT)  # <results>/report.html after a full run (hemexp.evaluation.run)


onerror:
    shell(f"hemexp failures --results {RESULTS}")
