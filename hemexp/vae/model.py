"""Hemorrhage-aware multi-head KL-VAE (paper §2.3): MONAI ``AutoencoderKL`` + three 1x1 output heads.

The encoder sees one axial slice as three channels (windowed CT in [0, 1], IPH {0, 1}, IVH {0, 1}) and
returns a spatial Gaussian latent ``(mu, sigma)`` at 1/2^(len(channels)-1) of the input size. The
decoder is MONAI's, with ``out_channels`` set to a feature width (``channels[0]``): its last 3x3 conv
yields shared features that go through SiLU and then three separate 1x1 convs — one per modality — so
CT gets a regression head and each hemorrhage class its own logit head (modality-specific supervision
as in the paper). Only these heads are written here; everything else is MONAI.

Checkpoint format (:meth:`MultiHeadVAE.save` / :func:`load_vae`): a plain ``torch.save`` dict
``{"format": "hemexp-vae/1", "config": <constructor kwargs>, "state_dict": ...}`` so downstream stages
(latent cache, diffusion, sampling) load the model without Lightning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL
from torch import nn

from hemexp.core.errors import reading_product
from hemexp.core.files import atomic_path

FORMAT = "hemexp-vae/1"
IN_CHANNELS = 3  # CT, IPH, IVH
HEADS = ("ct", "iph_logits", "ivh_logits")
MASK_PRIOR_LOGIT = -4.0


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of :class:`MultiHeadVAE` (the ``vae`` config keys that shape the network)."""

    channels: tuple[int, ...] = (64, 128, 256)
    num_res_blocks: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    attention_levels: tuple[bool, ...] = field(default=())  # empty = no attention (paper)

    @classmethod
    def from_cfg(cls, vae_cfg: dict[str, Any]) -> VAEConfig:
        """Build from the ``vae`` section of the resolved config."""
        return cls(
            channels=tuple(int(c) for c in vae_cfg["channels"]),
            num_res_blocks=int(vae_cfg["num_res_blocks"]),
            latent_channels=int(vae_cfg["latent_channels"]),
            norm_num_groups=int(vae_cfg["norm_num_groups"]),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels"] = list(self.channels)
        out["attention_levels"] = list(self.attention_levels)
        return out


class MultiHeadVAE(nn.Module):
    """KL-VAE over (CT, IPH, IVH) slices with a shared decoder and CT / IPH / IVH heads.

    Shapes: input ``x`` [B, 3, H, W] with H, W divisible by :attr:`downsample_factor`;
    latent [B, latent_channels, H/f, W/f]. ``decode`` returns linear CT (≈ windowed CT, clamp to
    [0, 1] for display) and IPH / IVH *logits*; :meth:`decode_probs` gives clamped CT and probabilities.
    """

    def __init__(self, config: VAEConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = config or VAEConfig(**kwargs)
        cfg = self.config
        attention = tuple(cfg.attention_levels) or (False,) * len(cfg.channels)
        self.feature_channels = int(cfg.channels[0])
        self.autoencoder = AutoencoderKL(
            spatial_dims=2,
            in_channels=IN_CHANNELS,
            out_channels=self.feature_channels,
            channels=tuple(cfg.channels),
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=attention,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
        )
        self.heads = nn.ModuleDict({name: nn.Conv2d(self.feature_channels, 1, kernel_size=1) for name in HEADS})
        for name in ("iph_logits", "ivh_logits"):  # rare-foreground prior (p ~ 0.02), as in RetinaNet:
            nn.init.constant_(self.heads[name].bias, MASK_PRIOR_LOGIT)  # early steps do not fight p = 0.5

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction of the latent: 2 per level after the first (x4 for three levels)."""
        return 2 ** (len(self.config.channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters ``(mu, sigma)``, each [B, latent_channels, H/f, W/f]."""
        return self.autoencoder.encode(x)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (posterior mean): what the latent cache and evaluation use."""
        return self.encode(x)[0]

    @staticmethod
    def sample(mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw ``mu + sigma * eps``; ``generator`` makes it reproducible (exact resume)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + sigma * eps

    def decode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent -> ``{"ct": [B,1,H,W], "iph_logits": [B,1,H,W], "ivh_logits": [B,1,H,W]}``."""
        features = nn.functional.silu(self.autoencoder.decode(z))
        return {name: head(features) for name, head in self.heads.items()}

    def decode_probs(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent -> ``{"ct": CT clamped to [0, 1], "iph": P(IPH), "ivh": P(IVH)}`` (each [B,1,H,W])."""
        out = self.decode(z)
        return {
            "ct": out["ct"].clamp(0.0, 1.0),
            "iph": torch.sigmoid(out["iph_logits"]),
            "ivh": torch.sigmoid(out["ivh_logits"]),
        }

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Encode, sample the posterior, decode: ``(outputs, mu, sigma)`` as in MONAI's AutoencoderKL."""
        mu, sigma = self.encode(x)
        return self.decode(self.sample(mu, sigma, generator)), mu, sigma

    def save(self, path: str | Path) -> None:
        """Write the plain-torch checkpoint (atomic): architecture + weights, no Lightning needed."""
        payload = {"format": FORMAT, "config": self.config.to_dict(), "state_dict": self.state_dict()}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)


def load_vae(path: str | Path, map_location: str | torch.device | None = "cpu") -> MultiHeadVAE:
    """Load a model written by :meth:`MultiHeadVAE.save`, in eval mode with gradients off."""
    with reading_product(path, "train-vae", what="VAE model"):
        payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a HemExp VAE checkpoint (expected format {FORMAT!r})")
    raw = payload["config"]
    config = VAEConfig(
        channels=tuple(raw["channels"]),
        num_res_blocks=int(raw["num_res_blocks"]),
        latent_channels=int(raw["latent_channels"]),
        norm_num_groups=int(raw["norm_num_groups"]),
        attention_levels=tuple(raw.get("attention_levels", ())),
    )
    model = MultiHeadVAE(config)
    model.load_state_dict(payload["state_dict"])
    model.eval().requires_grad_(False)
    if map_location is not None:
        model.to(map_location)
    return model


@torch.no_grad()
def reconstruct(vae: MultiHeadVAE, x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] slices -> [N, 3, H, W] (clamped CT, P(IPH), P(IVH)) via the posterior mean."""
    probs = vae.decode_probs(vae.encode_mean(x.float()))
    return torch.cat([probs["ct"], probs["iph"], probs["ivh"]], dim=1).float()
