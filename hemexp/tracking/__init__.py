"""Experiment tracking: :mod:`~hemexp.tracking.runs` (MLflow store, run tags: stage, variant, config
hash, git commit, data version), :mod:`~hemexp.tracking.compare` (runs side by side) and
:mod:`~hemexp.tracking.cli` (``hemexp compare``). Imports only :mod:`hemexp.core`."""
