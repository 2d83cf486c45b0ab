"""Choosing where tensors live, and seeding every random number generator we use."""

from __future__ import annotations

import random

import torch


def pick_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple's MPS, then the CPU; any other name ("cpu", "cuda:1") is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed: int) -> None:
    """Seed Python's and PyTorch's generators (CPU and every GPU) so runs repeat."""
    random.seed(seed)
    torch.manual_seed(seed)
