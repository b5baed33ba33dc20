"""VAE stage (``rules/vae.smk``): the multi-head KL-VAE (CT, IPH and IVH heads) and its fidelity.

Modules: :mod:`~hemexp.vae.model` (network, save/load), :mod:`~hemexp.vae.losses` (reconstruction,
segmentation, KL, adversarial and perceptual terms), :mod:`~hemexp.vae.data` (slice datasets read
from the Parquet shards, shared with the diffusion stage), :mod:`~hemexp.vae.train` (Lightning module
and ``train-vae``), :mod:`~hemexp.vae.fidelity` (``eval-vae``: SSIM/Dice table),
:mod:`~hemexp.vae.figures` (reconstruction montages) and :mod:`~hemexp.vae.cli`.
"""
