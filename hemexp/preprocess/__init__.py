"""Preprocessing: skull stripping, template registration, model-grid resampling, QC, per-patient pipeline."""
