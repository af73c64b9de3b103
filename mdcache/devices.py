"""Device and precision choice, shared by extraction and training so `auto` means the same everywhere."""
from __future__ import annotations

import os

from .errors import ConfigError
from .lazy import lazy

torch = lazy("torch")


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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware (Ampere and newer). `is_bf16_supported()` alone also counts emulation, which V100 and
    T4 offer at less than fp32's speed."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on GPUs with native bf16, fp16 autocast on older GPUs (V100, T4; training scales
    the loss with a GradScaler), fp32 on CPUs (CPU bf16 is slow on most)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        return ("bf16" if native_bf16(device) else "fp16") if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 (it would "
                          "be emulated, slower than fp32); use --precision fp16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The one autocast context of the project: bf16 or fp16 autocast, a no-op for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> "torch.amp.GradScaler":
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (a disabled scaler is a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
