"""VAE training losses (paper §2.3): CT L1/L2 + perceptual + least-squares PatchGAN, IPH/IVH Dice+BCE, KL.

Library pieces: MONAI ``DiceCELoss`` (sigmoid Dice + ``BCEWithLogitsLoss`` for one-channel logits),
``PatchDiscriminator`` and ``PatchAdversarialLoss(criterion="least_squares")``, and MONAI's LPIPS-style
feature normalisation helpers. Hand-written here, because no library does it offline:

* the KL term of a diagonal Gaussian against N(0, I) (MONAI has no KL loss; the formula is the one in
  MONAI's generative tutorials);
* :class:`LocalPerceptualLoss`. MONAI's ``PerceptualLoss`` always fetches its networks (LPIPS,
  torchvision, torch.hub), which cannot work offline, and ``lpips``/``torchvision`` must not be
  installed. So the perceptual term uses a MONAI ``ResNet`` feature extractor whose weights come from a
  *local* file (``vae.loss.perceptual_weights``) and compares LPIPS-style unit-normalised features.
  Without that file the term is off, announced by one log line.

Warm-ups follow the paper's reference code: a term's weight is 0 before its warm-up step and its full
value from then on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss, PatchAdversarialLoss
from monai.losses.perceptual import medicalnet_intensity_normalisation, normalize_tensor, spatial_average
from monai.networks.nets import PatchDiscriminator, resnet
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

PERCEPTUAL_ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class LossWeights:
    """The ``vae.loss`` config section, typed."""

    ct: str
    ct_weight: float
    seg_weight: float
    iph_weight: float
    ivh_weight: float
    kl_weight: float
    adv_weight: float
    adv_warmup_steps: int
    disc_lr: float
    disc_channels: int
    disc_layers: int
    perceptual_weight: float
    perceptual_warmup_steps: int
    perceptual_weights: str | None

    @classmethod
    def from_cfg(cls, loss_cfg: dict[str, Any]) -> LossWeights:
        return cls(**{k: loss_cfg[k] for k in cls.__dataclass_fields__})


def warmup_weight(weight: float, step: int, warmup_steps: int) -> float:
    """``weight`` from ``warmup_steps`` on, 0 before (the reference code's hard switch-on)."""
    return float(weight) if step >= warmup_steps else 0.0


def ct_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Pixel-wise CT loss: mean squared (paper) or absolute error."""
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float())
    if kind == "l1":
        return F.l1_loss(pred.float(), target.float())
    raise ValueError(f"vae.loss.ct must be 'l1' or 'l2', got {kind!r}")


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)), summed over latent elements, averaged over the batch."""
    mu, sigma = mu.float(), sigma.float()
    per_item = 0.5 * torch.sum(mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1, dim=list(range(1, mu.ndim)))
    return per_item.mean()


def segmentation_loss() -> DiceCELoss:
    """Dice + BCE on one-channel logits. ``batch=True`` pools the Dice over the batch, so slices
    without IVH (most of them) neither give undefined per-slice Dice nor dominate the gradient."""
    return DiceCELoss(sigmoid=True, batch=True)


def build_discriminator(channels: int, num_layers: int) -> PatchDiscriminator:
    """MONAI PatchGAN on the CT channel (the adversarial term acts on CT only, as in the paper)."""
    return PatchDiscriminator(spatial_dims=2, channels=channels, num_layers_d=num_layers, in_channels=1,
                              out_channels=1, norm="BATCH")


def _squash_depth(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """3D conv kernels [O, I, kx, ky, kz] -> 2D [O, I, kx, ky] by summing over z.

    A 2D slice is then treated exactly as a volume that is constant along z (up to boundary padding),
    so 3D feature networks (e.g. MedicalNet-style MONAI ResNets) can serve 2D slices.
    """
    return {k: (v.sum(dim=-1) if v.ndim == 5 else v) for k, v in state.items()}


def _read_perceptual_file(path: Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], tuple[str, ...]]:
    """Parse a weights file: either ``{"arch", "kwargs", "state_dict", "layers"}`` or a bare ResNet state dict."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in payload:
        arch = payload.get("arch", "resnet10")
        kwargs = dict(payload.get("kwargs", {}))
        state = payload["state_dict"]
        layers = tuple(payload.get("layers", RESNET_STAGES[:3]))
    else:
        arch, kwargs, state, layers = "resnet10", {}, payload, RESNET_STAGES[:3]
    # the classifier head is never used: drop it so any head size loads
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    if "conv1.weight" not in state:
        raise ValueError(f"{path}: no 'conv1.weight' — not a MONAI/MedicalNet ResNet state dict")
    state = _squash_depth(state)
    conv1 = state["conv1.weight"]
    kwargs.setdefault("n_input_channels", int(conv1.shape[1]))
    kwargs.setdefault("conv1_t_size", int(conv1.shape[-1]))
    kwargs["feed_forward"] = False
    kwargs.setdefault("bias_downsample", any(k.endswith("downsample.0.bias") for k in state))
    kwargs["spatial_dims"] = 2
    if arch not in PERCEPTUAL_ARCHS:
        raise ValueError(f"{path}: arch {arch!r} not one of {PERCEPTUAL_ARCHS}")
    bad = [name for name in layers if name not in RESNET_STAGES]
    if bad:
        raise ValueError(f"{path}: layers {bad} not among {RESNET_STAGES}")
    return arch, kwargs, state, layers


class LocalPerceptualLoss(nn.Module):
    """LPIPS-style distance on a frozen MONAI ResNet loaded from a local weights file.

    For every chosen stage the features of input and target are unit-normalised over channels,
    their squared difference is summed over channels and averaged over space (as LPIPS without its
    learned linear layer), and the stages are summed. Inputs are z-scored first, as MedicalNet expects.
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        arch, kwargs, state, layers = _read_perceptual_file(Path(weights_path))
        net = getattr(resnet, arch)(pretrained=False, **kwargs)
        missing, _ = net.load_state_dict(state, strict=False)
        needed = [k for k in missing if k.split(".")[0] in ("conv1", "bn1", *layers)]
        if needed:
            raise ValueError(f"{weights_path}: weights missing for {needed[:5]}{'...' if len(needed) > 5 else ''}")
        self.net = net.eval().requires_grad_(False)
        self.layers = layers
        self.in_channels = int(kwargs["n_input_channels"])

    def train(self, mode: bool = True) -> LocalPerceptualLoss:
        """The feature network stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.net.eval()
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        feats = []
        for name in RESNET_STAGES[: max(RESNET_STAGES.index(n) for n in self.layers) + 1]:
            x = getattr(net, name)(x)
            if name in self.layers:
                feats.append(x)
        return feats

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        if self.in_channels != pred.shape[1]:
            pred = pred.expand(-1, self.in_channels, -1, -1)
            target = target.expand(-1, self.in_channels, -1, -1)
        pred, target = medicalnet_intensity_normalisation(pred), medicalnet_intensity_normalisation(target)
        total = pred.new_zeros(())
        for fp, ft in zip(self.features(pred), self.features(target), strict=True):
            diff = (normalize_tensor(fp) - normalize_tensor(ft)).pow(2).sum(dim=1, keepdim=True)
            total = total + spatial_average(diff).mean()
        return total


def build_perceptual_loss(weights_path: str | None, weight: float) -> LocalPerceptualLoss | None:
    """The perceptual term, or ``None`` (with one log line saying why) when it cannot or need not run."""
    if not weights_path:
        log.info("perceptual loss off: vae.loss.perceptual_weights is not set (no local feature-network weights)")
        return None
    if weight <= 0:
        log.info("perceptual loss off: vae.loss.perceptual_weight is 0")
        return None
    path = Path(weights_path)
    if not path.exists():
        raise FileNotFoundError(f"vae.loss.perceptual_weights: {path} does not exist")
    module = LocalPerceptualLoss(path)
    log.info("perceptual loss on: %s (layers %s)", path, ", ".join(module.layers))
    return module


class VAELoss(nn.Module):
    """All VAE loss terms and their schedule; :meth:`generator` and :meth:`discriminator` return
    dicts of named scalars (``total`` is what gets back-propagated)."""

    def __init__(self, weights: LossWeights):
        super().__init__()
        self.w = weights
        self.seg = segmentation_loss()
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.perceptual = build_perceptual_loss(weights.perceptual_weights, weights.perceptual_weight)

    def adversarial_on(self, step: int) -> bool:
        return warmup_weight(self.w.adv_weight, step, self.w.adv_warmup_steps) > 0

    def generator(self, x: torch.Tensor, out: dict[str, torch.Tensor], mu: torch.Tensor, sigma: torch.Tensor,
                  step: int, discriminator: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Generator (VAE) loss for target slices ``x`` [B, 3, H, W] at optimizer step ``step``."""
        w = self.w
        ct_true, iph_true, ivh_true = x[:, 0:1].float(), x[:, 1:2].float(), x[:, 2:3].float()
        ct_pred = out["ct"].float()
        terms = {
            "ct": ct_reconstruction_loss(ct_pred, ct_true, w.ct),
            "iph": self.seg(out["iph_logits"].float(), iph_true),
            "ivh": self.seg(out["ivh_logits"].float(), ivh_true),
            "kl": kl_loss(mu, sigma),
        }
        total = (w.ct_weight * terms["ct"]
                 + w.seg_weight * (w.iph_weight * terms["iph"] + w.ivh_weight * terms["ivh"])
                 + w.kl_weight * terms["kl"])
        p_w = warmup_weight(w.perceptual_weight, step, w.perceptual_warmup_steps)
        if self.perceptual is not None and p_w > 0:
            terms["perceptual"] = self.perceptual(ct_pred, ct_true)
            total = total + p_w * terms["perceptual"]
        a_w = warmup_weight(w.adv_weight, step, w.adv_warmup_steps)
        if discriminator is not None and a_w > 0:
            logits_fake = discriminator(ct_pred.contiguous())[-1]
            terms["adv"] = self.adversarial(logits_fake, target_is_real=True, for_discriminator=False)
            total = total + a_w * terms["adv"]
        terms["total"] = total
        return terms

    def discriminator(self, ct_real: torch.Tensor, ct_fake: torch.Tensor, discriminator: nn.Module) -> torch.Tensor:
        """Least-squares PatchGAN loss of the discriminator (reconstruction detached)."""
        logits_fake = discriminator(ct_fake.detach().float().contiguous())[-1]
        logits_real = discriminator(ct_real.float().contiguous())[-1]
        fake = self.adversarial(logits_fake, target_is_real=False, for_discriminator=True)
        real = self.adversarial(logits_real, target_is_real=True, for_discriminator=True)
        return 0.5 * (fake + real)
