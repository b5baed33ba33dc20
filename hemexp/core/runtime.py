"""Process-wide runtime set-up shared by every entry point: logging format and seeding."""

from __future__ import annotations

import logging
import random

import numpy as np

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """Module logger; the CLI configures handlers once."""
    return logging.getLogger(name)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (if imported) torch, for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # torch-free stages (synth, manifest checks) stay importable without it
        return
    torch.manual_seed(seed)
