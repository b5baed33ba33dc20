"""Training engine shared by the VAE and diffusion stages (Lightning plumbing, no model).

:mod:`~hemexp.engine.trainer`: precision/device resolution, step-keyed random generators and batch
samplers (exact resume after a kill), checkpoint fingerprints and resume, EMA, MLflow step metrics, and
``make_trainer``. Imports only :mod:`hemexp.core`.
"""
