# Shared by every rules file: the resolved config that jobs read, and per-section hashes that make a
# rule rerun exactly when the config keys it depends on change (Snakemake's `params` rerun trigger).
from hemexp.config import config_hash
from hemexp.workflow import PATIENT_ID_PATTERN, rule_resources
from hemexp.workflow_config import write_resolved_config

RESOLVED_CONFIG = write_resolved_config(config)  # pass to jobs as `params: config=RESOLVED_CONFIG`
HEMEXP_ENV = "../envs/hemexp.yaml"  # `conda: HEMEXP_ENV` in every rule (--sw-deployment-method conda)


def cfg_hash(*sections):
    """Hash of the config sections a rule depends on; used as a `params` entry (rerun trigger)."""
    return config_hash(config, sections)


def R(rule_name):
    """Per-rule SLURM resources from config (see hemexp.workflow.rule_resources)."""
    return rule_resources(config, rule_name)
