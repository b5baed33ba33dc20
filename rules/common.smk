# Shared by every rules file, and the only names one rules file may take from another: the cohort,
# the result layout (every path comes from hemexp.core.layout, so a rule and the code writing its
# output cannot spell it differently), model and sample paths, the resolved config that jobs read,
# per-section hashes that make a rule rerun exactly when the config keys it depends on change
# (Snakemake's `params` rerun trigger), and per-rule cluster resources.
import re

from hemexp.cohort.patients import PATIENT_ID_PATTERN, workflow_patients
from hemexp.core.commands import exit_on_usage_error
from hemexp.core.config import config_hash, sampled_variants, variants
from hemexp.core.layout import Layout, manifest_path
from hemexp.sampling.flags import flag_source_passes
from hemexp.workflow.resolved_config import write_resolved_config
from hemexp.workflow.index import training_inputs
from hemexp.workflow.resources import rule_resources

L = Layout.of(config)
RESULTS = config["results_dir"]
# The cohort, validated (every bad manifest row at once; no patients or no training patients is an
# error too) but raw files are not required: a patient whose file is missing fails its own ingest job
# (and lands in qc/failures.tsv) while the others run; rule validate_manifest lists missing files.
with exit_on_usage_error("hemexp workflow"):
    PATIENTS = {p.patient_id: p for p in workflow_patients(config)}
TRAIN = sorted(pid for pid, p in PATIENTS.items() if p.split == "train")
TEST = sorted(pid for pid, p in PATIENTS.items() if p.split == "test")
VARIANTS = list(variants(config))
SAMPLED = sampled_variants(config)
MANIFEST = str(manifest_path(config))
FINAL_TARGETS = []  # each rules/*.smk appends the products that `snakemake` (rule all) must build

RESOLVED_CONFIG = write_resolved_config(config)  # pass to jobs as `params: config=RESOLVED_CONFIG`
HEMEXP_ENV = "../envs/hemexp.yaml"  # `conda: HEMEXP_ENV` in every rule (--sw-deployment-method conda)
FROZEN = bool(config["freeze_models"])  # keep existing models: their training rules are not defined

# Products that rules of several files read (model paths, per-patient folders, sample files).
VAE_MODEL = str(L.vae_model)
LATENT_STATS = str(L.latent_stats)
DIFFUSION_MODEL = str(L.diffusion_model("{variant}"))  # format with variant=...
CLASSIFIER = str(L.classifier)
OOD_ENVELOPE = str(L.ood_envelope)
USES_CLASSIFIER = str(config["sampling"]["flag_source"]) == "classifier"
# Extra expansion-flag passes (evaluation.flag_source_passes): source -> variants, sampled by rule
# sample_flag_source under samples_<source>/ and scored by rule evaluate as their own Table 2 rows.
FLAG_PASSES = flag_source_passes(config)


# Folder outputs. ingest and preprocess write one patient's folder at once (a temporary folder, then one
# rename: hemexp.core.files.atomic_dir), so the folder is their output (`directory()`) and what later jobs
# declare, not the 9 and 14 files inside; a sample job's N x 3 sample NIfTIs are one folder too. Each
# declared file costs Snakemake work in every job that names it: with the file lists, a 10,000-patient
# DAG took 3.4x the CPU of the toy anchor's (docs/orchestration.md, Scale). As with any directory()
# output, a file deleted by hand inside such a folder is not noticed; the reading command then fails
# on it, naming it (`--forcerun` the producer).
def ingested_dir(patient):
    """One patient's ingested/ folder (rule ingest's output; a wildcard or an ID)."""
    return str(L.ingested(patient))


def preprocessed_dir(patient):
    """One patient's preprocessed/ folder (rule preprocess's output; a wildcard or an ID)."""
    return str(L.preprocessed(patient))


def one_of(names):
    """Wildcard regex matching exactly one of the names (only for short lists: variants, sources)."""
    return "|".join(re.escape(n) for n in sorted(names)) or "NO_MATCH"


def cfg_hash(*sections):
    """Hash of the config sections a rule depends on; used as a `params` entry (rerun trigger)."""
    return config_hash(config, sections)


def R(rule_name):
    """SLURM resources of one rule, the entry named after it (see hemexp.workflow.resources)."""
    return rule_resources(config, rule_name)


def release_study(variant):
    """The clinical-guidance products a variant's model card shows (rules/release.smk): those of the
    perturbation study when ``variant`` is its variant and there are test patients, else none."""
    if TEST and config["evaluation"]["perturbation_variant"] == variant:
        return list(rules.perturb.output)
    return []


# Training-split indexes (hemexp/workflow/index.py): a training rule reads index/train_<family>.txt,
# not every training patient's file, so building a 10,000-patient DAG is not quadratic
# (docs/orchestration.md, Scale).
def train_index(family):
    return str(L.index(family))
