"""Scale-shift (AdaGN) conditioning for MONAI's diffusion U-Net: a variant's ``scale_shift: true``.

MONAI's ``DiffusionUNetResnetBlock`` adds the projected time (+ clinical + flag) embedding to the
feature map as a per-channel bias, and the next GroupNorm removes each group's mean of that bias and
divides by a spread it has inflated: the condition reaches the block weakened. Dhariwal & Nichol
(2021, "use_scale_shift_norm") instead project the embedding to a scale and a shift applied *after*
the normalisation, ``GN(h) · (1 + s) + b``, which nothing downstream normalises away and which can
gate features multiplicatively (grow the rim or not), the stronger form in their ablations.

Hand-written because MONAI 1.6 offers no such option (diffusers' U-Net does, as
``resnet_time_scale_shift``, but it is another backbone with another weight layout). The wrapper
reuses every submodule of MONAI's block as is; only the embedding projection is widened to 2 × the
block's channels.
"""

from __future__ import annotations

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch import nn


class ScaleShiftResnetBlock(nn.Module):
    """MONAI's residual block with the embedding applied as scale and shift after ``norm2``."""

    def __init__(self, block: DiffusionUNetResnetBlock):
        super().__init__()
        if block.spatial_dims != 2:
            raise ValueError("scale-shift conditioning is implemented for 2D U-Nets")
        self.block = block
        block.time_emb_proj = nn.Linear(block.time_emb_proj.in_features, 2 * block.out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b = self.block
        h = b.nonlinearity(b.norm1(x))
        if b.upsample is not None:
            x, h = b.upsample(x), b.upsample(h)
        elif b.downsample is not None:
            x, h = b.downsample(x), b.downsample(h)
        h = b.conv1(h)
        scale, shift = b.time_emb_proj(b.nonlinearity(emb))[:, :, None, None].chunk(2, dim=1)
        h = b.norm2(h) * (1 + scale) + shift
        h = b.conv2(b.nonlinearity(h))
        return b.skip_connection(x) + h


def use_scale_shift(unet: nn.Module) -> int:
    """Swap every MONAI residual block of ``unet`` for its scale-shift form; returns how many."""
    names = [name for name, m in unet.named_modules() if isinstance(m, DiffusionUNetResnetBlock)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, ScaleShiftResnetBlock(getattr(parent, child)))
    return len(names)
