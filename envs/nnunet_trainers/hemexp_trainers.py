"""HemExp's entry in nnU-Net v2's trainer folder: short trainers, and the short variants made findable.

This file is copied by ``hemexp.baselines.nnunet.run.install_trainer_plugin`` into
``nnunetv2/training/nnUNetTrainer/`` of the nnU-Net environment (the folder that nnU-Net documents as
the place for custom trainers). It runs there, never inside HemExp's own environment.

Why it exists: nnU-Net finds ``-tr <name>`` by importing, in sorted order, every module of that folder
and then of its subpackages until one defines ``<name>``. The subpackage ``primus`` sorts before
``variants`` and imports timm, which imports torchvision. torchvision's only build for Linux on PyPI is
a CUDA build whose compiled ops need a CUDA torch; with the CPU torch wheel its import raises
``RuntimeError: operator torchvision::nms does not exist``, so every trainer under ``variants/``
(``nnUNetTrainer_1epoch``, ``nnUNetTrainer_5epochs``, ...) is unreachable. Top-level modules of the
folder are searched before any subpackage, so re-exporting those classes here makes them reachable,
unchanged, without touching timm (the Primus/EVA architectures that need it are not used by HemExp).
With a CUDA torch (``envs/nnunet.yaml``) torchvision imports and the re-exports are merely redundant.

The two HemExp trainers below only shorten nnU-Net's epochs (the CPU demo and the test smoke run);
the paper configuration uses nnU-Net's own ``nnUNetTrainer``.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# Star imports on purpose: every class of the two training-length modules, whatever their number.
from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import *  # noqa: F403
from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring import *  # noqa: F403

CUDA = torch.device("cuda")  # nnU-Net's default device argument (the CLI passes the real one)


class nnUNetTrainer_HemExpDemo(nnUNetTrainer):
    """CPU demo: 5 epochs of 12 iterations (nnU-Net's default: 1000 x 250).

    Even ``nnUNetTrainer_1epoch`` (250 iterations + a 50-iteration validation) took 12 min on 3 tiny cases
    on the shared 2-core machine, and 5 x 25 iterations of the demo cohort's 2d plan (batch 22) took
    20 min, so the embedded demo needs short epochs; nnU-Net exposes them only as trainer attributes.
    Everything else (network, loss, augmentation, learning-rate schedule) is nnU-Net's.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
        self.num_iterations_per_epoch = 12
        self.num_val_iterations_per_epoch = 3


class nnUNetTrainer_HemExpSmoke(nnUNetTrainer):
    """Test smoke run: 1 epoch of 4 iterations; proves plan -> train -> predict works, learns nothing."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 2
