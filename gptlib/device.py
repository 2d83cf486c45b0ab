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


def fast_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run natively, so mixed precision is faster than fp32: a CUDA GPU with bf16 support
    (Ampere and later), or a CPU with AVX-512 BF16 or AMX. Elsewhere bf16 is emulated, and slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch >= 2.3; absent means unknown
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def set_seed(seed: int) -> None:
    """Seed Python's and PyTorch's generators (CPU and every GPU) so runs repeat."""
    random.seed(seed)
    torch.manual_seed(seed)
