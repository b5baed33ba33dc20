"""Conditioning of the latent diffusion U-Net: baseline latents, clinical vector and expansion flag.

The paper conditions the denoiser three ways, and each has its own path into the network:

* **baseline latent(s)** — concatenated to the noisy progression ``Δz`` along channels (spatial
  conditioning: the residual is only meaningful next to the anatomy it modifies). For 2.5D variants
  the neighbouring slices' baseline latents are concatenated too.
* **clinical variables** — the clamped, [0, 1]-scaled vector of :data:`hemexp.core.clinical.CLINICAL_NAMES`,
  embedded by a small MLP and *added* to the time embedding. Classifier-free guidance acts on this
  branch only: a learned null embedding replaces the clinical embedding where ``drop_clinical`` is set
  (randomly with probability ``diffusion.clinical_dropout`` in training; explicitly at sampling, so the
  conditional and the null branch run in one batched call).
* **expansion flag** — a learned ``nn.Embedding(2, dim)`` added to the time embedding; never dropped.

Optionally (a variant's ``cross_attention: true``) the same inputs also travel as **tokens** for MONAI's
cross-attention (``with_conditioning``; :class:`ConditionTokens`): one token per clinical variable and
one for the flag, attended by every spatial position at the U-Net's attention levels, so the condition
can act differently on different parts of the image (the growing rim, not the whole slice) instead of
as one additive shift of every feature map. The null clinical tokens are learned too.

MONAI's ``DiffusionModelUNet`` adds ``self.class_embedding(class_labels)`` to its time embedding and
has no additive continuous-vector input. Rather than copying its forward pass, :class:`ConditionEmbedding`
takes the place of that ``class_embedding`` module: the three per-sample inputs travel packed in the
``class_labels`` tensor (:func:`pack_condition`), so MONAI's own forward runs unchanged. This is the
only hand-written part of the conditioning; everything else is MONAI.
"""

from __future__ import annotations

import torch
from torch import nn

from hemexp.core.clinical import CLINICAL_NAMES

N_CLINICAL = len(CLINICAL_NAMES)
CONDITIONINGS = ("i", "ic", "ice")


def uses_clinical(conditioning: str) -> bool:
    """Whether a conditioning code ('i', 'ic', 'ice') feeds the clinical vector."""
    _check_conditioning(conditioning)
    return "c" in conditioning


def uses_flag(conditioning: str) -> bool:
    """Whether a conditioning code feeds the expansion flag."""
    _check_conditioning(conditioning)
    return "e" in conditioning


def _check_conditioning(conditioning: str) -> None:
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning {conditioning!r} is not one of {CONDITIONINGS}")


def pack_condition(clinical: torch.Tensor, flag: torch.Tensor, drop_clinical: torch.Tensor) -> torch.Tensor:
    """Pack per-sample conditions into one float tensor ``[B, n_clinical + 2]`` for MONAI's ``class_labels``.

    Layout: clinical values, then the flag (0/1), then the drop mask (0/1). Float32 holds 0 and 1
    exactly, so unpacking in :class:`ConditionEmbedding` is lossless.
    """
    batch = clinical.shape[0]
    if flag.shape != (batch,) or drop_clinical.shape != (batch,):
        raise ValueError(f"flag {tuple(flag.shape)} and drop_clinical {tuple(drop_clinical.shape)} must be [{batch}]")
    return torch.cat(
        [clinical.float(), flag.float().unsqueeze(1), drop_clinical.float().unsqueeze(1)], dim=1
    )


def unpack_condition(packed: torch.Tensor, n_clinical: int = N_CLINICAL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_condition`: (clinical float, flag long, drop bool), checked; shared by the
    additive embedding and the cross-attention tokens, which read the same packed tensor."""
    if packed.ndim != 2 or packed.shape[1] != n_clinical + 2:
        raise ValueError(f"packed condition must be [B, {n_clinical + 2}], got {tuple(packed.shape)}")
    clinical = packed[:, : n_clinical]
    flag = packed[:, n_clinical].round().long()
    drop = packed[:, n_clinical + 1] > 0.5
    if ((flag < 0) | (flag > 1)).any():
        raise ValueError("expansion flag must be 0 or 1")
    return clinical, flag, drop


class ConditionEmbedding(nn.Module):
    """Clinical MLP + learned null embedding + expansion-flag embedding, summed into one vector.

    Used as the ``class_embedding`` of MONAI's U-Net (see module docstring): called with the packed
    tensor from :func:`pack_condition`, returns ``[B, dim]`` that MONAI adds to the time embedding.

    Args:
        dim: time-embedding width of the U-Net (``4 * channels[0]`` in MONAI).
        conditioning: 'ic' (clinical) or 'ice' (clinical + flag); 'i' needs no embedding at all.
        n_clinical: length of the clinical vector.
        hidden: width of the clinical MLP's hidden layer.
    """

    def __init__(self, dim: int, conditioning: str, n_clinical: int = N_CLINICAL, hidden: int = 64):
        super().__init__()
        if not uses_clinical(conditioning):
            raise ValueError(f"conditioning {conditioning!r} has no clinical branch; build the U-Net without one")
        self.n_clinical = n_clinical
        self.clinical_mlp = nn.Sequential(nn.Linear(n_clinical, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        # Small random init (not zeros) so the null branch differs from any real input from step 0.
        self.null_clinical = nn.Parameter(torch.randn(dim) * 0.02)
        self.flag_embedding = nn.Embedding(2, dim) if uses_flag(conditioning) else None

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        clinical, flag, drop = self.unpack(packed)
        emb = self.clinical_mlp(clinical)
        emb = torch.where(drop.unsqueeze(1), self.null_clinical.to(emb.dtype).expand_as(emb), emb)
        if self.flag_embedding is not None:
            emb = emb + self.flag_embedding(flag).to(emb.dtype)
        return emb

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse of :func:`pack_condition`: (clinical float, flag long, drop bool)."""
        return unpack_condition(packed, self.n_clinical)


class ConditionTokens(nn.Module):
    """Cross-attention context ``[B, n_clinical + flag, dim]`` from the packed condition.

    Clinical variable i becomes ``value_i * w_i + b_i`` (its own learned direction and offset, then a
    shared MLP), the flag its own embedding; where ``drop_clinical`` is set the clinical tokens are
    replaced by learned null tokens (classifier-free guidance acts on this branch exactly as on the
    additive one). The flag token is never dropped.
    """

    def __init__(self, dim: int, conditioning: str, n_clinical: int = N_CLINICAL):
        super().__init__()
        if not uses_clinical(conditioning):
            raise ValueError(f"conditioning {conditioning!r} has no clinical branch; no tokens to attend to")
        self.n_clinical = n_clinical
        self.weight = nn.Parameter(torch.randn(n_clinical, dim) * 0.02)
        self.bias = nn.Parameter(torch.randn(n_clinical, dim) * 0.02)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))
        self.null_tokens = nn.Parameter(torch.randn(n_clinical, dim) * 0.02)
        self.flag_embedding = nn.Embedding(2, dim) if uses_flag(conditioning) else None

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        clinical, flag, drop = unpack_condition(packed, self.n_clinical)
        tokens = self.mlp(clinical.unsqueeze(-1) * self.weight + self.bias)
        tokens = torch.where(drop[:, None, None], self.null_tokens.to(tokens.dtype).expand_as(tokens), tokens)
        if self.flag_embedding is not None:
            tokens = torch.cat([tokens, self.flag_embedding(flag).to(tokens.dtype).unsqueeze(1)], dim=1)
        return tokens
