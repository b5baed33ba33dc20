# Shared by every rules file: the resolved config that jobs read, and per-section hashes that make a
# rule rerun exactly when the config keys it depends on change (Snakemake's `params` rerun trigger).
from hemexp.core.config import config_hash
from hemexp.cohort.patients import PATIENT_ID_PATTERN
from hemexp.workflow.resources import rule_resources
from hemexp.workflow.resolved_config import write_resolved_config

RESOLVED_CONFIG = write_resolved_config(config)  # pass to jobs as `params: config=RESOLVED_CONFIG`
HEMEXP_ENV = "../envs/hemexp.yaml"  # `conda: HEMEXP_ENV` in every rule (--sw-deployment-method conda)


def cfg_hash(*sections):
    """Hash of the config sections a rule depends on; used as a `params` entry (rerun trigger)."""
    return config_hash(config, sections)


def R(rule_name):
    """Per-rule SLURM resources from config (see hemexp.workflow.resources.rule_resources)."""
    return rule_resources(config, rule_name)
