"""Device and precision choice, shared by extraction and training so `auto` means the same everywhere."""
from __future__ import annotations

import os

import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """auto: this rank's GPU under torchrun (LOCAL_RANK), else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on GPUs that support it, fp32 elsewhere (CPU bf16 is slow on most CPUs)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision {precision!r}: choose auto, fp32 or bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU does not support bfloat16")
    return precision


def autocast(device: torch.device, precision: str):
    """The one autocast context of the project: bf16 when precision is 'bf16', a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
