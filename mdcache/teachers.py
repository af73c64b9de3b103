"""Teachers by spec string, and the feature tap that turns an image batch into patch targets.

    clip-b16                  open_clip ViT-B-16, OpenAI weights (MaskDistill's teacher)
    clip-l14                  open_clip ViT-L-14, OpenAI weights
    open_clip:ARCH[:TAG]      any open_clip architecture (ARCH may be a model-config .json file)
    timm:MODEL_NAME           any timm ViT

Taps: `final` (last block output, patch tokens, before ln_post; MaskDistill default),
`ln_post` (after the final norm), `proj` (after ln_post and the CLIP projection; BEiT v2's choice).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .devices import resolve_device, resolve_precision  # noqa: F401 (re-exported)

ALIASES = {"clip-b16": "open_clip:ViT-B-16:openai", "clip-l14": "open_clip:ViT-L-14:openai"}
TAPS = ("final", "ln_post", "proj")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TeacherError(RuntimeError):
    """The teacher cannot be built as asked (unknown spec, missing weights, unsupported tap)."""


@dataclass
class Teacher:
    spec: str
    model: nn.Module
    features: Callable[[torch.Tensor], torch.Tensor]  # normalized images [B,3,H,W] -> [B, P, D]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    patch_grid: tuple[int, int]
    dim: int
    identity: dict  # goes into the cache fingerprint

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """'clip-b16' | 'open_clip:ARCH[:TAG]' | 'timm:NAME' -> (family, arch, pretrained tag)."""
    spec = ALIASES.get(spec, spec)
    family, _, rest = spec.partition(":")
    if family not in ("open_clip", "timm") or not rest:
        raise TeacherError(f"unknown teacher {spec!r}; use {', '.join(ALIASES)}, open_clip:ARCH[:PRETRAINED] or timm:MODEL")
    if family == "open_clip":
        arch, _, tag = rest.partition(":")
        return family, arch, tag or None
    return family, rest, None


def weights_digest(model: nn.Module) -> str:
    """Content hash of the weights: a cache records *which* teacher, not just its name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _missing_weights(spec: str, what: str, err: Exception) -> TeacherError:
    return TeacherError(
        f"teacher {spec!r}: could not load {what} ({type(err).__name__}: {err}).\n"
        "Provide the weights one of these ways:\n"
        "  --weights PATH   a local checkpoint (.safetensors, .bin or .pt state dict) for this architecture\n"
        "  a populated Hugging Face cache (HF_HOME) copied from a machine with access, used offline\n"
        "Use --random-init only for tests and demos (recorded in the cache fingerprint).")


def _open_clip(spec: str, arch: str, tag: str | None, weights: str | None, random_init: bool,
               tap: str, image_size: int | None):
    import open_clip

    if arch.endswith(".json"):
        if not os.path.exists(arch):
            raise TeacherError(f"open_clip model config {arch!r} does not exist")
        open_clip.add_model_config(arch)
        arch = os.path.basename(arch)[:-5]
    if arch not in open_clip.list_models():
        raise TeacherError(f"open_clip has no architecture {arch!r} (see open_clip.list_models())")
    kw = {"force_image_size": image_size} if image_size else {}
    pretrained = None if random_init else (weights or tag)
    if pretrained is None and not random_init:
        raise TeacherError(f"teacher {spec!r} names no weights: pass --weights PATH or --random-init")
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, **kw)
    except TeacherError:
        raise
    except Exception as e:
        raise _missing_weights(spec, f"weights {pretrained!r}", e) from e
    visual = model.visual
    del model
    if tap == "final":
        def features(x):
            return visual.forward_intermediates(x, indices=1, intermediates_only=True,
                                                output_fmt="NLC")["image_intermediates"][0]
        dim = visual.transformer.width
    elif tap in ("ln_post", "proj"):
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            raise TeacherError(f"teacher {spec!r}: tap {tap!r} needs a plain CLS-pooled ViT")
        visual.output_tokens = True

        def features(x):
            tokens = visual(x)[1]
            return tokens @ visual.proj if tap == "proj" else tokens
        dim = visual.proj.shape[1] if tap == "proj" else visual.transformer.width
    else:
        raise TeacherError(f"unknown tap {tap!r}; choose one of {', '.join(TAPS)}")
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
    return visual, features, mean, std, int(size), tuple(visual.grid_size), int(dim)


def _timm(spec: str, name: str, weights: str | None, random_init: bool, tap: str, image_size: int | None):
    import timm

    kw = {"num_classes": 0}
    if image_size:
        kw["img_size"] = image_size
    if weights:
        kw["pretrained_cfg_overlay"] = {"file": weights}
    try:
        model = timm.create_model(name, pretrained=not random_init, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise TeacherError(f"timm has no model {name!r}") from e
        raise _missing_weights(spec, "pretrained weights", e) from e
    except Exception as e:
        raise _missing_weights(spec, "pretrained weights", e) from e
    if tap == "final":
        def features(x):
            return model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[0]
    elif tap == "ln_post":
        def features(x):
            return model.forward_features(x)[:, model.num_prefix_tokens:]
    else:
        raise TeacherError(f"tap {tap!r} is not available for timm teachers (use final or ln_post)")
    cfg = model.pretrained_cfg
    size = model.patch_embed.img_size[0]
    return model, features, tuple(cfg["mean"]), tuple(cfg["std"]), int(size), tuple(model.patch_embed.grid_size), int(model.embed_dim)


def load_teacher(spec: str, *, weights: str | None = None, random_init: bool = False, tap: str = "final",
                 image_size: int | None = None, device: str | torch.device = "cpu", seed: int = 0) -> Teacher:
    """Build a frozen teacher. Random init is seeded (so `verify` can rebuild it) and loudly recorded."""
    if tap not in TAPS:
        raise TeacherError(f"unknown tap {tap!r}; choose one of {', '.join(TAPS)}")
    if weights and not os.path.exists(weights):
        raise TeacherError(f"--weights {weights!r} does not exist")
    if weights and random_init:
        raise TeacherError("--weights and --random-init exclude each other")
    family, arch, tag = parse_spec(spec)
    if random_init:
        torch.manual_seed(seed)
    build = _open_clip(spec, arch, tag, weights, random_init, tap, image_size) if family == "open_clip" \
        else _timm(spec, arch, weights, random_init, tap, image_size)
    model, features, mean, std, size, grid, dim = build
    model.eval().requires_grad_(False).to(device)
    source = "random-init" if random_init else ("file:" + os.path.basename(weights) if weights else f"pretrained:{tag or 'timm'}")
    identity = {"family": family, "arch": os.path.basename(arch).removesuffix(".json"), "weights": source,
                "weights_sha256": weights_digest(model), "tap": tap, "image_size": size, "mean": list(mean),
                "std": list(std)}
    if random_init:
        identity["init_seed"] = seed
    return Teacher(spec=spec, model=model, features=features, mean=mean, std=std, image_size=size,
                   patch_grid=grid, dim=dim, identity=identity)


@torch.inference_mode()
def run_teacher(teacher: Teacher, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Normalized images -> float32 patch features [B, P, D]."""
    device = next(teacher.model.parameters()).device
    x = x.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = teacher.features(x)
    return out.float()
