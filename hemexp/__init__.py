"""HemExp: clinically-guided latent diffusion for modelling hematoma expansion after ICH."""

__version__ = "0.1.0"
