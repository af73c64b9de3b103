"""The classifier side of a timm model, shared by finetune, eval and knn: build it (never downloading),
load a pretrained backbone into it, read what a weights file says about itself, and measure it.

A weights file describes itself in its safetensors metadata (the convention of every writer here):
"model" (timm name), "image_size", optional "global_pool", "num_classes", "crop_pct", "mean"/"std"
(JSON lists), "layer_scale", "kind". Older files wrote "timm_model" and "img_size"/"input_size";
`describe_weights` reads both.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from mdcache.devices import autocast
from mdcache.errors import ConfigError, UserError

from .checkpoint import read_state_dict, weights_metadata
from .runtime import Dist, all_reduce_sum

# Parameters a pretraining checkpoint may carry that a classifier does not use (ignored on --init).
PRETRAIN_ONLY_KEYS = ("mask_token",)
DEFAULT_IMAGE_SIZE = 224


class InitError(UserError):
    """A --init/--weights file that does not fit the model. The message names the file and the keys."""


def build_model(name: str, num_classes: int, image_size: int, drop_path: float = 0.0, global_pool: str | None = None,
                layer_scale: float | None = None, model_args: dict | None = None) -> torch.nn.Module:
    """timm.create_model without pretrained downloads; ViTs get img_size=image_size; model_args are further
    timm arguments (a small custom ViT: patch_size, embed_dim, depth, num_heads...)."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"--model {name!r}: not a timm model name (see timm.list_models())")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": drop_path,
                              **{k: v for k, v in (model_args or {}).items() if k != "img_size"}}
    if global_pool:
        kwargs["global_pool"] = global_pool
    if layer_scale:
        kwargs["init_values"] = layer_scale
    try:
        return timm.create_model(name, pretrained=False, img_size=image_size, **kwargs)
    except TypeError as e:  # models without an img_size argument (CNNs) take any input size
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, pretrained=False, **kwargs)


def layer_scale_of(path: str) -> float | None:
    """Weights pretrained with LayerScale (`mdtrain pretrain --layer-scale`) need a model that has it;
    the value itself is overwritten by the loaded gammas."""
    return 1e-5 if any(k.endswith((".ls1.gamma", ".gamma_1")) for k in read_state_dict(path)) else None  # ViT, BEiT


def describe_weights(path: str, model: str | None = None, image_size: int | None = None,
                     global_pool: str | None = None, model_args: dict | None = None) -> dict:
    """What rebuilds the model of a weights file: explicit options win, then its metadata (current or
    legacy keys), then defaults. Returns {"model", "image_size", "global_pool", "model_args", "meta"}."""
    if "://" not in path and not os.path.exists(path):
        raise ConfigError(f"{path}: no such weights file")
    meta = weights_metadata(path)
    model = model or meta.get("model") or meta.get("timm_model")
    if not model:
        raise ConfigError(f"--model is required: {path} does not record its model name")
    size = image_size or next((int(meta[k]) for k in ("image_size", "img_size", "input_size") if meta.get(k)),
                              DEFAULT_IMAGE_SIZE)
    args = model_args if model_args else json.loads(meta.get("model_args") or "{}")
    return {"model": model, "image_size": size, "global_pool": global_pool or meta.get("global_pool") or None,
            "model_args": args, "meta": meta}


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    cls = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = cls if isinstance(cls, (list, tuple)) else (cls,)
    return tuple(f"{n}." for n in names)


@torch.no_grad()
def scale_head(model: torch.nn.Module, scale: float) -> list[str]:
    """Multiply the classifier's parameters by `scale` (BEiT v2 `init_scale`, 0.001): a new head starts
    with near-zero logits, so its first gradients do not disturb the pretrained backbone. Returns their names."""
    heads = classifier_prefixes(model)
    params = {n: p for n, p in model.named_parameters() if n.startswith(heads)}
    for p in params.values():
        p.mul_(scale)
    return list(params)


def load_backbone(model: torch.nn.Module, path: str) -> dict:
    """Load pretrained weights into `model`; only the classifier may be missing, shapes must fit.

    Adapts what has one right answer: a classifier of another shape (or for a headless model) is
    dropped, the final norm moves to fc_norm for avg pooling, and an absolute pos-embed is resampled
    to the new grid. Everything else that does not fit raises InitError naming file and keys.
    """
    sd = dict(read_state_dict(path))
    target = model.state_dict()
    heads = classifier_prefixes(model)
    notes: list[str] = []
    for k in [k for k in sd if k.startswith(heads) and (k not in target or target[k].shape != sd[k].shape)]:
        notes.append(f"dropped checkpoint classifier {k} {tuple(sd.pop(k).shape)}")
    if "fc_norm.weight" in target and "fc_norm.weight" not in sd and "norm.weight" in sd \
            and "norm.weight" not in target:
        for p in ("weight", "bias"):
            if f"norm.{p}" in sd:
                sd[f"fc_norm.{p}"] = sd.pop(f"norm.{p}")
        notes.append("moved norm.* to fc_norm.* (avg pooling)")
    if ("pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape
            and sd["pos_embed"].shape[-1] == target["pos_embed"].shape[-1]):  # same width, another grid
        sd["pos_embed"] = resample_pos_embed(model, sd["pos_embed"], target["pos_embed"], path)
        notes.append(f"resampled pos_embed to {tuple(target['pos_embed'].shape)}")
    for k in [k for k in sd if k not in target and k in PRETRAIN_ONLY_KEYS]:
        sd.pop(k)
        notes.append(f"ignored pretraining-only {k}")
    bad_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in target.items() if k in sd and sd[k].shape != v.shape]
    missing = [k for k in target if k not in sd]
    unexpected = sorted(k for k in sd if k not in target)
    missing_backbone = [k for k in missing if not k.startswith(heads)]
    if bad_shape or missing_backbone or unexpected:
        lines = [f"{path} does not fit {type(model).__name__} "
                 f"({getattr(model, 'pretrained_cfg', {}).get('architecture', '?')}):"]
        if bad_shape:
            lines.append(f"  {len(bad_shape)} tensor(s) with another shape: " + "; ".join(bad_shape[:6]))
        if missing_backbone:
            lines.append(f"  {len(missing_backbone)} backbone tensor(s) missing: " + ", ".join(missing_backbone[:8]))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected[:8]))
        lines.append("  Was it saved from the same --model (and timm naming)? Only the classifier may be missing.")
        raise InitError("\n".join(lines))
    model.load_state_dict(sd, strict=False)
    return {"file": path, "loaded": len(sd), "missing": missing, "unexpected": unexpected, "notes": notes}


def resample_pos_embed(model: torch.nn.Module, pe: torch.Tensor, want: torch.Tensor, path: str) -> torch.Tensor:
    """An absolute position embedding on another square grid, interpolated to the model's grid."""
    from timm.layers import resample_abs_pos_embed

    prefix = getattr(model, "num_prefix_tokens", 1) if not getattr(model, "no_embed_class", False) else 0
    old, new = pe.shape[1] - prefix, want.shape[1] - prefix
    if math.isqrt(old) ** 2 != old or math.isqrt(new) ** 2 != new:
        raise InitError(f"{path}: pos_embed {tuple(pe.shape)} cannot be resampled to {tuple(want.shape)}")
    n = math.isqrt(new)
    return resample_abs_pos_embed(pe, new_size=[n, n], num_prefix_tokens=prefix)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterator, device: torch.device, precision: str,
                     dist: Dist | None = None) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over all batches (summed over ranks)."""
    model.eval()
    c1 = c5 = loss = n = 0.0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y.view(-1, 1))
        c1 += hit[:, :1].sum().item()
        c5 += hit.sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    c1, c5, loss, n = all_reduce_sum([c1, c5, loss, n], dist or Dist())
    if n == 0:
        raise RuntimeError("evaluation saw no images")
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "n": int(n)}
