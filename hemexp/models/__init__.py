"""Networks: the multi-head VAE (:mod:`~hemexp.models.vae`, losses in :mod:`~hemexp.models.losses`)
and the conditional diffusion U-Net (:mod:`~hemexp.models.diffusion`, :mod:`~hemexp.models.conditioning`).

Submodules are imported explicitly (``from hemexp.models.vae import load_vae``) so that importing the
package stays free of torch/MONAI for the light CLI commands.
"""
