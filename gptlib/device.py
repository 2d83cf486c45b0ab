"""Choosing where tensors live, and seeding every random number generator we use."""

from __future__ import annotations

import random

import torch

from .errors import UserInputError


def pick_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple's MPS, then the CPU; any other name ("cpu", "cuda:1") is used as given,
    once we know this machine has it (otherwise a UserInputError lists what it has)."""
    if name != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_devices() -> list[str]:
    """The devices this machine has, as --device names: "cpu", then "cuda:0".. and "mps" when present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device(name: str) -> torch.device:
    """``torch.device(name)`` when this machine can use it; else an error naming what it has."""
    has = f"this machine has: {', '.join(available_devices())}. Use --device auto to pick the best of them"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserInputError(f"--device {name}: not a device name PyTorch knows; {has}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        built = "" if torch.backends.cuda.is_built() else " (this PyTorch is built without CUDA)"
        raise UserInputError(f"--device {name}: no CUDA GPU is usable here{built}; {has}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserInputError(f"--device {name}: there is no GPU number {device.index}; {has}")
    if device.type not in ("cpu", "cuda", "meta"):
        try:  # mps, xpu and the rest: the sure test is to put a tensor there
            torch.empty(1, device=device)
        except Exception:  # noqa: BLE001 - each backend fails its own way; all mean "not here"
            raise UserInputError(f"--device {name}: this machine cannot use it; {has}") from None
    return device


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
