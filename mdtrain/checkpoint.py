"""Checkpoints that load with `torch.load(weights_only=True)`, and timm-loadable student weights.

`last.ckpt` holds only tensors and plain Python types (model, optimizer, scheduler, loader position,
per-rank RNG states, config), so loading never unpickles arbitrary objects. It is written to a
temporary file and renamed into place: a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from typing import Any

import torch

CKPT_NAME = "last.ckpt"
WEIGHTS_NAME = "student.safetensors"
CKPT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot resume this run (missing, unreadable, or made for another layout)."""


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Load a trainer checkpoint safely (weights_only=True: no arbitrary unpickling)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} is unreadable: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} is not an mdtrain pretrain checkpoint (version {CKPT_VERSION})")
    return ckpt


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG state(s) as tensors (drop path and dropout draw from these)."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device: torch.device, world: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG state, collected on all ranks (ranks draw different drop-path noise)."""
    mine = rng_state(device)
    if world == 1:
        return [mine]
    import torch.distributed as dist

    out: list[dict[str, torch.Tensor]] = [dict() for _ in range(world)]
    for name, t in mine.items():
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.to(device) if dist.get_backend() == "nccl" else t)
        for r, p in enumerate(parts):
            out[r][name] = p.cpu()
    return out


def save_student(path: str, student_state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Backbone weights in timm naming as safetensors (loadable with `timm.create_model(name,
    pretrained=True, pretrained_cfg_overlay={'file': path})` or `load_state_dict(strict=False)`)."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in student_state.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
