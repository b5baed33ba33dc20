"""JSON schema of the config, one file per top-level section (read by :func:`hemexp.core.config.config_schema`)."""
