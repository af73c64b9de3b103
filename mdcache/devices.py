"""Device and precision choice, shared by extraction and training so `auto` means the same everywhere."""
from __future__ import annotations

import os

import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """auto: this rank's GPU under torchrun (cuda:LOCAL_RANK), else the CPU. cuda: this rank's GPU, which
    must exist. cuda:N: that GPU, for one process only: with several processes every rank would land on
    the same GPU (NCCL then fails on the duplicate), so each rank takes cuda:LOCAL_RANK instead."""
    try:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is available to this process (torch "
                          f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                          "use --device cpu")
    local, world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if dev.index is not None and world > 1:
        raise ConfigError(f"--device {name}: a fixed GPU index with {world} processes would put every rank on one "
                          "GPU; use --device cuda (or auto): each rank takes cuda:LOCAL_RANK")
    index = local if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: GPU {index} (LOCAL_RANK {local}) does not exist; this machine has "
                          f"{torch.cuda.device_count()} visible GPU(s): start at most that many processes per node")
    return torch.device("cuda", index)


def use_device(name: str = "auto") -> torch.device:
    """resolve_device, and make it this process's current GPU (kernels and allocations of libraries that
    ask for 'cuda' land on it, not on GPU 0)."""
    device = resolve_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


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
