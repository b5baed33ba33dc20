"""Diffusion stage (``rules/diffusion.smk``): latents and the conditional latent diffusion model of
Δz = z_followup − z_baseline.

Modules: :mod:`~hemexp.diffusion.latents` (``encode``, ``latent-stats``: cached posterior means and
train-split channel statistics), :mod:`~hemexp.diffusion.conditioning` (clinical MLP with a learned
null embedding, expansion-flag embedding), :mod:`~hemexp.diffusion.model` (conditional U-Net, noise
schedule, save/load), :mod:`~hemexp.diffusion.train` (v-prediction + min-SNR training, balanced
batches, EMA, sample grid) and :mod:`~hemexp.diffusion.cli`.
"""
