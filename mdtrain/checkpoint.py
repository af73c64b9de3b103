"""All weight and trainer-state I/O of the trainer: one format, one version field, one resume check.

    <out>/last.ckpt          trainer state (model, optimizer, scheduler, position, RNG, config):
                             {"version": 1, "kind": "pretrain" | "finetune", ...}; tensors and
                             plain Python types only, so it loads with torch.load(weights_only=True)
    <out>/*.safetensors      weights timm loads, with what evaluation needs to rebuild the model
                             in the metadata ("model", "image_size", ...)

Every file is written to a temporary name and renamed into place: a crash mid-save leaves the
previous file intact. Weights files are read through `mdcache.weights` (never unpickled).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from mdcache.errors import UserError
from mdcache.weights import WeightsError, read_state_dict  # noqa: F401 (the trainer reads weights here)

CKPT_NAME = "last.ckpt"
WEIGHTS_NAME = "student.safetensors"
CKPT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot resume this run (missing, unreadable, or made for another layout)."""


def _failed_write(path: str, tmp: str, e: BaseException) -> CheckpointError:
    """A write that failed (full disk, quota, file size limit): its temp file goes, the previous file stays."""
    try:
        os.unlink(tmp)
    except OSError:
        pass
    why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
    return CheckpointError(f"writing {path} failed ({why}; a full disk?); the previous {os.path.basename(path)}, if "
                           "any, is intact")


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a short write as a RuntimeError
        raise _failed_write(path, tmp, e) from None


def save_trainer_state(path: str, kind: str, state: dict) -> None:
    atomic_torch_save({"version": CKPT_VERSION, "kind": kind, **state}, path)


def load_trainer_state(path: str, kind: str) -> dict:
    """Load a trainer checkpoint safely (weights_only=True: no arbitrary unpickling) and check it is
    this command's kind and this format's version."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} is unreadable: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("version") != CKPT_VERSION or ckpt.get("kind", "pretrain") != kind:
        raise CheckpointError(f"checkpoint {path!r} is not an mdtrain {kind} checkpoint (version {CKPT_VERSION})")
    return ckpt


def check_resumable(saved: dict, now: dict, path: str) -> None:
    """Exact resume needs the same layout: name every knob that differs instead of silently diverging."""
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in now.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"cannot resume exactly from {path} (" + "; ".join(diff) + ")")


def resolve_resume(resume: str | None, out: str) -> str | None:
    """--resume PATH, or 'auto' = OUT/last.ckpt when it exists (None otherwise)."""
    if resume == "auto":
        path = os.path.join(out, CKPT_NAME)
        return path if os.path.exists(path) else None
    if resume and not os.path.exists(resume):
        raise CheckpointError(f"--resume {resume}: no such file")
    return resume


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
    """Every rank's RNG state, collected on all ranks (ranks draw different drop-path noise). RNG states are
    CPU tensors (the GPU's too): they are gathered over the gloo control group into CPU buffers, the
    collective's own device (NCCL would need every buffer on the GPU)."""
    from .runtime import control_group

    mine = rng_state(device)
    if world == 1:
        return [mine]
    import torch.distributed as dist

    group = control_group()
    assert dist.get_backend(group) == "gloo", "RNG states are gathered on the CPU, over gloo"
    out: list[dict[str, torch.Tensor]] = [dict() for _ in range(world)]
    for name, t in mine.items():
        parts = [torch.empty_like(t, device="cpu") for _ in range(world)]
        dist.all_gather(parts, t.cpu(), group=group)
        for r, p in enumerate(parts):
            out[r][name] = p
    return out


def weights_meta(kind: str, model: str, image_size: int, mean, std, model_args: dict | None = None,
                 layer_scale: float | None = None, **extra: Any) -> dict[str, Any]:
    """The metadata every weights file carries, so that eval/knn/linprobe/finetune --init and a timm teacher
    rebuild the model and feed it what it was trained on (one writer: pretrain and finetune alike)."""
    meta = {"model": model, "image_size": image_size, "kind": kind, "mean": json.dumps(list(mean)),
            "std": json.dumps(list(std))}
    if model_args:
        meta["model_args"] = json.dumps(model_args)
    if layer_scale:
        meta["layer_scale"] = layer_scale
    return {**meta, **{k: v for k, v in extra.items() if v is not None}}


def save_weights(path: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Safetensors weights in timm naming (atomic), metadata values stored as strings. Loadable with
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay={'file': path})`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp,
                  metadata={k: str(v) for k, v in metadata.items()})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; teammates on a shared disk must read weights too
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise _failed_write(path, tmp, e) from None


def weights_metadata(path: str) -> dict[str, str]:
    """The metadata of a safetensors file ({} for other files)."""
    if not path.endswith(".safetensors") or not os.path.exists(path):
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})
