"""Reading a weights file without ever unpickling it.

A weights file may come from a shared bucket, so it is untrusted input: `.safetensors` files are
read with safetensors, anything else with `torch.load(weights_only=True)`, which refuses arbitrary
objects. The libraries (timm, open_clip) are only ever handed the resulting state dict.
"""
from __future__ import annotations

import os

from .errors import UserError
from .lazy import lazy

torch = lazy("torch")


class WeightsError(UserError):
    """A weights file that is missing, unreadable, unsafe, or holds no state dict. The message names it."""


def read_metadata(path: str) -> dict[str, str]:
    """The string metadata of a .safetensors file ({} for other files): mdtrain writes the model's name,
    arguments and the input normalization it was trained with there."""
    if not path.endswith(".safetensors") or not os.path.exists(path):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a local .safetensors file, or the state dict in a weights-only torch file
    (the file itself, or its 'model' / 'state_dict' / 'student' entry; a DDP 'module.' prefix is dropped)."""
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):
        import safetensors.torch

        try:
            return safetensors.torch.load_file(path)
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: refused: not a safetensors file nor a weights-only torch checkpoint; nothing "
                           f"is unpickled from weights files (convert it to .safetensors on a trusted machine). "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    for key in ("model", "state_dict", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: no state dict of tensors found (expected the file itself or its 'model' entry)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj
