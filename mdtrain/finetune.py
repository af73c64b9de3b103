"""`mdtrain finetune`: a pretrained student backbone -> a measured classifier (BEiT v2 recipe defaults).

A flat loop in the style of facebookresearch/mae's main_finetune.py, with timm doing the parts
timm already does well: the model (drop path), layer-wise lr decay (create_optimizer_v2), the
cosine schedule with warmup, RandAugment + random erasing (create_transform), Mixup/CutMix with
label smoothing, and the model EMA. The same command without --init is the from-scratch baseline.

Outputs in --out: config.json, metrics.jsonl (one line per epoch), curves.png,
last.safetensors / best.safetensors (weights timm loads, model name in the metadata),
last.ckpt (full trainer state for --resume) and best.ckpt (the best epoch's metrics).
Every .ckpt loads with torch.load(weights_only=True): nothing is pickled but tensors and plain data.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape

from mdcache import sources
from mdcache.config import opt, parse_floats
from mdcache.devices import resolve_device, resolve_precision
from mdcache.store import fetch

from . import labelled
from .outputs import OutputDir

console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
CKPT_FORMAT = "mdtrain-finetune-v1"
# Parameters a pretraining checkpoint may carry that a classifier does not use (ignored on --init).
PRETRAIN_ONLY_KEYS = ("mask_token",)


class InitError(RuntimeError):
    """A --init/--weights file that does not fit the model. The message names the file and the keys."""


@dataclass
class FinetuneConfig:
    """Finetune a timm classifier from a pretrained student backbone (BEiT v2 recipe defaults)."""

    train: str = opt("", "Labelled training data: WebDataset tars with .cls (brace pattern, glob, list), an image "
                         "folder with one sub-folder per class, or with --loader ffcv a .beton file.")
    val: str = opt("", "Labelled validation data (same forms as --train).")
    model: str = opt("vit_base_patch16_224", "timm model name.")
    init: str = opt("", "Pretrained backbone (safetensors in timm naming, e.g. runs/pt/student.safetensors, or a "
                        ".ckpt with a 'model' state dict). Empty: the from-scratch baseline.")
    out: str = opt("runs/ft", "Output directory or fsspec URL (remote: mirrored locally, uploaded after every epoch).")
    num_classes: int = opt(0, "Number of classes; 0 = inferred from --train (class folders, or max .cls + 1).")
    input_size: int = opt(224, "Image side in pixels (ViTs get it as img_size; a pretrained pos-embed is resampled).")
    global_pool: str = opt("", "timm global_pool: '' = the model's default ('token' for ViTs), 'avg' = mean pooling.")
    norm: str = opt("imagenet", "Input mean/std: imagenet (what mdtrain pretrain feeds the student) or model (timm's config).")
    epochs: int = opt(100, "Training epochs.")
    warmup_epochs: float = opt(20.0, "Linear warmup epochs (the lr is updated every step).")
    batch_size: int = opt(128, "Batch size per process (effective batch = batch-size x processes).")
    blr: float = opt(5e-4, "Base learning rate for an effective batch of 256: lr = blr x batch / 256.")
    lr: float = opt(0.0, "Absolute peak learning rate; > 0 overrides --blr.")
    min_lr: float = opt(1e-6, "Learning rate at the end of the cosine schedule.")
    warmup_lr: float = opt(1e-6, "Learning rate at the start of warmup.")
    weight_decay: float = opt(0.05, "AdamW weight decay (not applied to norms, biases, tokens, pos-embed).")
    layer_decay: float = opt(0.65, "Layer-wise lr decay (BEiT); 1.0 = off.")
    drop_path: float = opt(0.1, "Stochastic depth rate.")
    clip_grad: float = opt(0.0, "Clip the gradient norm to this value; 0 = off.")
    smoothing: float = opt(0.1, "Label smoothing.")
    mixup: float = opt(0.8, "Mixup alpha; 0 = off.")
    cutmix: float = opt(1.0, "CutMix alpha; 0 = off.")
    mixup_prob: float = opt(1.0, "Probability of applying mixup or cutmix to a batch.")
    mixup_switch_prob: float = opt(0.5, "Probability of cutmix instead of mixup when both are on.")
    aa: str = opt("rand-m9-mstd0.5-inc1", "timm auto-augment policy (RandAugment); 'none' = off. Default loader only.")
    color_jitter: float = opt(0.4, "Color jitter (timm applies it only when --aa is off). Default loader only.")
    reprob: float = opt(0.25, "Random erasing probability (both loaders).")
    remode: str = opt("pixel", "Random erasing mode: const, rand, pixel.")
    recount: int = opt(1, "Random erasing count.")
    crop_scale: str = opt("0.08,1.0", "RandomResizedCrop scale range 'min,max'.")
    crop_pct: float = opt(0.875, "Validation center-crop fraction (resize to input-size / crop-pct, crop input-size).")
    model_ema: bool = opt(False, "Keep an EMA of the weights (timm ModelEmaV3); evaluated and saved as ema.safetensors.")
    model_ema_decay: float = opt(0.9999, "EMA decay per step.")
    amp: str = opt("auto", "Autocast: auto (bf16 on GPUs that support it, fp32 elsewhere), bf16, fp32.")
    loader: str = opt("default", "default (PIL decode + timm transforms, streams shards) or ffcv (.beton from ffcv-build).")
    num_workers: int = opt(4, "Data loading workers per process (threads for ffcv).")
    train_size: int = opt(0, "Training images per epoch for the per-step lr schedule; 0 = count (scans tar headers).")
    shuffle_buffer: int = opt(1000, "Default loader: shuffle buffer size (samples).")
    seed: int = opt(0, "Seed: model init, data order, augmentation (per epoch and rank, so --resume is exact).")
    resume: str = opt("", "Trainer-state checkpoint to continue from (OUT/last.ckpt); 'auto' = OUT/last.ckpt if present.")
    stop_after: int = opt(0, "Stop after N epochs of this run (checkpoint written; --resume auto continues). 0 = run to --epochs.")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N.")
    log_every: int = opt(20, "Print a progress line every N steps (rank 0).")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE for remote sources (repeatable).")


# ----------------------------------------------------------------------------- runtime

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets RANK/WORLD_SIZE: join the group (NCCL on GPUs, gloo on CPU); otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_amp(spec: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for fp32 (same meaning of auto as everywhere: mdcache.devices)."""
    return torch.bfloat16 if resolve_precision(spec, device) == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Every epoch's randomness is a function of (seed, epoch, rank): resuming at an epoch replays it."""
    return (seed * 1000003 + epoch * 7919 + rank * 104729 + 1) % 2**31


# ----------------------------------------------------------------------------- model and weights

def build_model(name: str, num_classes: int, input_size: int, drop_path: float = 0.0, global_pool: str = "",
                layer_scale: float | None = None) -> torch.nn.Module:
    """timm.create_model without pretrained downloads; ViTs get img_size=input_size."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": drop_path}
    if global_pool:
        kwargs["global_pool"] = global_pool
    if layer_scale:
        kwargs["init_values"] = layer_scale
    try:
        return timm.create_model(name, pretrained=False, img_size=input_size, **kwargs)
    except TypeError as e:  # models without an img_size argument (CNNs) take any input size
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, pretrained=False, **kwargs)


def layer_scale_of(path: str) -> float | None:
    """Weights pretrained with LayerScale (`mdtrain pretrain --layer-scale`) need a model that has it;
    the value itself is overwritten by the loaded gammas."""
    return 1e-5 if any(k.endswith(".ls1.gamma") for k in read_state_dict(path)) else None


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    cls = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = cls if isinstance(cls, (list, tuple)) else (cls,)
    return tuple(f"{n}." for n in names)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file, or the 'model' state dict of a .ckpt/.pth (weights_only)."""
    import fsspec
    import safetensors.torch

    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InitError(f"{path}: no such file") from None
    if path.endswith(".safetensors"):
        try:
            return safetensors.torch.load(raw)
        except Exception as e:
            raise InitError(f"{path}: not a readable safetensors file ({e})") from e
    import io

    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InitError(f"{path}: not a safetensors file nor a weights-only torch checkpoint ({e})") from e
    for key in ("model", "state_dict", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InitError(f"{path}: no state dict of tensors found (expected the file itself or its 'model' entry)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


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
    if "fc_norm.weight" in target and "fc_norm.weight" not in sd and "norm.weight" in sd and "norm.weight" not in target:
        for p in ("weight", "bias"):
            if f"norm.{p}" in sd:
                sd[f"fc_norm.{p}"] = sd.pop(f"norm.{p}")
        notes.append("moved norm.* to fc_norm.* (avg pooling)")
    if ("pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape
            and sd["pos_embed"].shape[-1] == target["pos_embed"].shape[-1]):  # same width, another grid
        sd["pos_embed"] = _resample_pos_embed(model, sd["pos_embed"], target["pos_embed"], path)
        notes.append(f"resampled pos_embed to {tuple(target['pos_embed'].shape)}")
    ignored = [k for k in sd if k not in target and k in PRETRAIN_ONLY_KEYS]
    for k in ignored:
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


def _resample_pos_embed(model: torch.nn.Module, pe: torch.Tensor, want: torch.Tensor, path: str) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    prefix = getattr(model, "num_prefix_tokens", 1) if not getattr(model, "no_embed_class", False) else 0
    old, new = pe.shape[1] - prefix, want.shape[1] - prefix
    if math.isqrt(old) ** 2 != old or math.isqrt(new) ** 2 != new:
        raise InitError(f"{path}: pos_embed {tuple(pe.shape)} cannot be resampled to {tuple(want.shape)}")
    n = math.isqrt(new)
    return resample_abs_pos_embed(pe, new_size=[n, n], num_prefix_tokens=prefix)


def save_weights(model: torch.nn.Module, path: str, meta: dict) -> None:
    """Safetensors weights (atomic), with what eval needs to rebuild the model in the metadata."""
    import safetensors.torch

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    safetensors.torch.save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def weights_metadata(path: str) -> dict:
    """The metadata of a safetensors file ({} for other files)."""
    if not path.endswith(".safetensors") or not os.path.exists(path):
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def save_state(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------- data

@dataclass
class Split:
    """One labelled split behind either loader: how to get an epoch's batches, and its size."""

    samples: int
    num_classes: int
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]   # epoch -> (images, labels)


def data_config(model_name: str, norm: str = "imagenet") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std. 'imagenet' is what `mdtrain pretrain` feeds the student (MASKDISTILL.md), so a
    finetune sees the pixels its backbone learned on; 'model' takes the timm model's pretrained config
    (e.g. 0.5/0.5 for augreg ViTs) for backbones that came from elsewhere."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if not timm.is_model(model_name):
        raise ValueError(f"--model {model_name!r}: not a timm model name (see timm.list_models())")
    if norm == "imagenet":
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if norm != "model":
        raise ValueError(f"--norm {norm!r}: expected imagenet or model")
    pcfg = timm.models.get_pretrained_cfg(model_name)
    mean = getattr(pcfg, "mean", None) or IMAGENET_DEFAULT_MEAN
    std = getattr(pcfg, "std", None) or IMAGENET_DEFAULT_STD
    return tuple(mean), tuple(std)


def default_split(spec: str, transform: Callable, batch_size: int, num_workers: int, train: bool, seed: int,
                  num_classes: int, samples: int, shuffle_buffer: int, storage_options: dict) -> Split:
    """The PIL/WebDataset stream: sources -> decode -> timm transform -> DataLoader.

    num_classes 0 or samples 0 means "find out": one pass over the tar headers (cheap, no decode).
    samples < 0 means "not needed" (validation).
    """
    info = None
    if not num_classes or not samples:
        info = labelled.scan_source(spec, storage_options)
    shards = info.shards if info else sources.list_source(spec, storage_options)
    n_cls = num_classes or info.num_classes
    ds = labelled.LabelledShards(shards, transform, n_cls, shuffle=train, seed=seed, buffer=shuffle_buffer,
                                 storage_options=storage_options)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from labelled.make_loader(ds, batch_size, num_workers, train, seed, epoch)

    return Split(samples or info.samples, n_cls, batches)


def build_splits(cfg: FinetuneConfig, model_mean_std: tuple, dist: Dist, device: torch.device) -> tuple[Split, Split]:
    """Train and val splits for --loader default or ffcv, with --num-classes inferred if 0."""
    from timm.data import create_transform

    mean, std = model_mean_std
    so = _storage_options(cfg.storage_option)
    scale = parse_floats(cfg.crop_scale, 2, "--crop-scale")
    if cfg.loader == "ffcv":
        from . import ffcv_loader

        train = ffcv_loader.train_split(cfg.train, cfg.batch_size, cfg.input_size, scale, mean, std, cfg.num_workers,
                                        cfg.seed, dist.world, device, cfg.reprob, cfg.remode, cfg.recount,
                                        cfg.num_classes)
        val = ffcv_loader.val_split(cfg.val, cfg.batch_size, cfg.input_size, cfg.crop_pct, mean, std,
                                    cfg.num_workers, dist.rank, dist.world, device, train.num_classes)
        return train, val
    if cfg.loader != "default":
        raise ValueError(f"--loader {cfg.loader!r}: expected default or ffcv")
    aa = None if cfg.aa in ("", "none") else cfg.aa
    patch_randaugment()
    t_train = create_transform(cfg.input_size, is_training=True, scale=scale, auto_augment=aa,
                               color_jitter=cfg.color_jitter or None, interpolation="bicubic", re_prob=cfg.reprob,
                               re_mode=cfg.remode, re_count=cfg.recount, mean=mean, std=std)
    t_val = eval_transform(cfg.input_size, cfg.crop_pct, mean, std)
    train = default_split(cfg.train, t_train, cfg.batch_size, cfg.num_workers, True, cfg.seed, cfg.num_classes,
                          cfg.train_size, cfg.shuffle_buffer, so)
    val = default_split(cfg.val, t_val, cfg.batch_size, cfg.num_workers, False, cfg.seed, train.num_classes, -1,
                        0, so)
    return train, val


def posterize_compat(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, valid on Pillow >= 13: 0 bits kept is a black image (what older Pillow
    returned) instead of the ValueError that kills RandAugment's 'inc1' policy at magnitude 10."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_randaugment() -> None:
    """Route timm's Posterize ops through posterize_compat (must run before create_transform)."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize_compat


def eval_transform(input_size: int, crop_pct: float, mean: tuple, std: tuple) -> Callable:
    from timm.data import create_transform

    return create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=mean, std=std)


def _storage_options(items: list[str]) -> dict:
    from mdcache.store import parse_storage_options

    return parse_storage_options(items)


# ----------------------------------------------------------------------------- train and evaluate

def all_have_batch(ok: bool, dist: Dist, device: torch.device) -> bool:
    """DDP needs the same number of steps on every rank: stop when any rank runs out of data."""
    if dist.world == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def train_one_epoch(model: torch.nn.Module, criterion: Callable, batches: Iterator, optimizer: torch.optim.Optimizer,
                    scheduler: Any, epoch: int, steps_est: int, mixup: Any, ema: Any, cfg: FinetuneConfig,
                    dist: Dist, device: torch.device, amp: torch.dtype | None) -> dict:
    model.train()
    it = iter(batches)
    loss_sum, n_steps, n_images, t0 = 0.0, 0, 0, time.perf_counter()
    while True:
        batch = next(it, None)
        if not all_have_batch(batch is not None, dist, device):
            break
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
        scheduler.step(epoch + min(n_steps / steps_est, 1.0))  # per-step lr, warmup in (fractional) epochs
        if mixup is not None:
            x, y = mixup(x, y)
        with autocast(device, amp):
            loss = criterion(model(x), y)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {n_steps}; stopping")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        if ema is not None:
            ema.update(unwrap(model))
        loss_sum += loss.item()
        n_steps += 1
        n_images += len(x)
        if dist.main and cfg.log_every and n_steps % cfg.log_every == 0:
            console.print(f"epoch {epoch} step {n_steps}/{steps_est} loss {loss.item():.4f} "
                          f"lr {max_lr(optimizer):.2e} {n_images * dist.world / (time.perf_counter() - t0):.1f} img/s")
    totals = torch.tensor([loss_sum, n_steps, n_images], dtype=torch.float64)
    if dist.world > 1:
        torch.distributed.all_reduce(totals)
    loss_sum, steps, images = totals.tolist()
    if steps == 0:
        raise ValueError(f"epoch {epoch}: no training batch (fewer than --batch-size {cfg.batch_size} images per "
                           f"process in --train?)")
    return {"train_loss": loss_sum / steps, "lr": max_lr(optimizer), "steps": int(steps // dist.world),
            "images": int(images), "train_seconds": time.perf_counter() - t0}


def max_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterator, device: torch.device, amp: torch.dtype | None,
                     dist: Dist | None = None) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over all batches (summed over ranks)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss, n
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y.view(-1, 1))
        sums += torch.tensor([hit[:, :1].sum().item(), hit.sum().item(),
                              F.cross_entropy(logits, y, reduction="sum").item(), len(y)], dtype=torch.float64)
    if dist is not None and dist.world > 1:
        torch.distributed.all_reduce(sums)
    c1, c5, loss, n = sums.tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no images")
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "n": int(n)}


# ----------------------------------------------------------------------------- outputs

def write_metrics(out: str, rows: list[dict]) -> None:
    tmp = os.path.join(out, "metrics.jsonl.tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, os.path.join(out, "metrics.jsonl"))


def read_metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(out: str, rows: list[dict]) -> None:
    """curves.png: train loss and val top-1/top-5 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], marker="o", label="train loss")
    a.plot(ep, [r["val_loss"] for r in rows], marker="o", label="val loss")
    a.set_xlabel("epoch")
    a.legend()
    for key in ("val_top1", "val_top5", "ema_top1"):
        if any(key in r for r in rows):
            b.plot([r["epoch"] for r in rows if key in r], [r[key] for r in rows if key in r], marker="o", label=key)
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy (%)")
    b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command

def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a finetune; returns the last epoch's metrics plus the best top-1."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    if not cfg.train or not cfg.val:
        raise ValueError("--train and --val are both required")
    dist = init_distributed()
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    outdir = OutputDir(cfg.out, _storage_options(cfg.storage_option))  # local, or mirrored to a URL
    cfg = dataclasses.replace(cfg, out=outdir.local)
    resume = os.path.join(cfg.out, "last.ckpt") if cfg.resume == "auto" else cfg.resume
    state = _load_trainer_state(resume) if resume and os.path.exists(resume) else None
    if cfg.resume and cfg.resume != "auto" and state is None:
        raise FileNotFoundError(f"--resume {cfg.resume}: no such file")

    mean_std = data_config(cfg.model, cfg.norm)
    train, val = build_splits(cfg, mean_std, dist, device)
    num_classes = train.num_classes
    seed_all(cfg.seed)
    init = fetch(cfg.init, _storage_options(cfg.storage_option)) if cfg.init else ""
    model = build_model(cfg.model, num_classes, cfg.input_size, cfg.drop_path, cfg.global_pool,
                        layer_scale_of(init) if init else None)
    if init and state is None:
        report = load_backbone(model, init)
        if dist.main:
            console.print(f"init: {report['loaded']} tensors from {cfg.init}; missing (new classifier): "
                          f"{', '.join(report['missing']) or 'none'}; unexpected: none"
                          + "".join(f"; {n}" for n in report["notes"]))
    model.to(device)
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = unwrap(model)
    ema = ModelEmaV3(net, decay=cfg.model_ema_decay) if cfg.model_ema else None

    eff_batch = cfg.batch_size * dist.world
    lr = cfg.lr if cfg.lr > 0 else cfg.blr * eff_batch / 256
    optimizer = create_optimizer_v2(net, opt="adamw", lr=lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None)
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs, lr_min=cfg.min_lr, warmup_t=cfg.warmup_epochs,
                                  warmup_lr_init=cfg.warmup_lr, t_in_epochs=True)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if cfg.batch_size % 2:
            raise ValueError(f"--batch-size {cfg.batch_size}: mixup/cutmix need an even batch size")
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=num_classes)
        criterion: Callable = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    start_epoch, best = 0, {"val_top1": -1.0, "epoch": -1}
    if state is not None:
        _check_resumable(state, cfg, num_classes, resume)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        if dist.main:
            console.print(f"resumed from {resume} at epoch {start_epoch}")
    rows = [r for r in read_metrics(cfg.out) if r["epoch"] < start_epoch] if state else []
    steps_est = labelled.steps_per_epoch(train.samples, cfg.batch_size, dist.world)
    meta = {"model": cfg.model, "num_classes": num_classes, "input_size": cfg.input_size,
            "global_pool": cfg.global_pool, "crop_pct": cfg.crop_pct, "mean": json.dumps(mean_std[0]),
            "std": json.dumps(mean_std[1])}
    if dist.main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "resolved": {**meta, "lr": lr, "effective_batch": eff_batch,
                       "world": dist.world, "amp": str(amp), "train_samples": train.samples}}, f, indent=1)
        console.print(f"finetune {cfg.model}: {num_classes} classes, {train.samples} train images, "
                      f"effective batch {eff_batch}, lr {lr:.2e}, ~{steps_est} steps/epoch, amp {amp}, {device}")

    row: dict = {}
    end_epoch = min(cfg.epochs, start_epoch + cfg.stop_after) if cfg.stop_after > 0 else cfg.epochs
    for epoch in range(start_epoch, end_epoch):
        seed_all(epoch_seed(cfg.seed, epoch, dist.rank))
        stats = train_one_epoch(model, criterion, train.batches(epoch), optimizer, scheduler, epoch, steps_est,
                                mixup, ema, cfg, dist, device, amp)
        v = evaluate_batches(model, val.batches(epoch), device, amp, dist)
        row = {"epoch": epoch, **stats, "val_top1": v["top1"], "val_top5": v["top5"], "val_loss": v["loss"], "val_n": v["n"]}
        if ema is not None:
            e = evaluate_batches(ema.module, val.batches(epoch), device, amp, dist)
            row.update(ema_top1=e["top1"], ema_top5=e["top5"])
        is_best = row["val_top1"] > best["val_top1"]
        if is_best:
            best = {"val_top1": row["val_top1"], "val_top5": row["val_top5"], "epoch": epoch}
        rows.append(row)
        if dist.main:
            save_weights(net, os.path.join(cfg.out, "last.safetensors"), {**meta, "epoch": epoch})
            if ema is not None:
                save_weights(ema.module, os.path.join(cfg.out, "ema.safetensors"), {**meta, "epoch": epoch, "ema": True})
            if is_best:
                save_weights(net, os.path.join(cfg.out, "best.safetensors"), {**meta, "epoch": epoch})
                save_state({"format": CKPT_FORMAT, "epoch": epoch, "metrics": row, "config": dataclasses.asdict(cfg)},
                           os.path.join(cfg.out, "best.ckpt"))
            save_state({"format": CKPT_FORMAT, "epoch": epoch, "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None, "best": best,
                        "num_classes": num_classes, "config": dataclasses.asdict(cfg)},
                       os.path.join(cfg.out, "last.ckpt"))
            write_metrics(cfg.out, rows)
            plot_curves(cfg.out, rows)
            outdir.push()
            console.print(f"epoch {epoch}: train loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, "
                          f"val top-1 {row['val_top1']:.2f} top-5 {row['val_top5']:.2f} (best {best['val_top1']:.2f} "
                          f"@ {best['epoch']})" + (f", ema top-1 {row['ema_top1']:.2f}" if ema is not None else ""))
        if dist.world > 1:
            torch.distributed.barrier()
    return {**row, "best_top1": best["val_top1"], "best_epoch": best["epoch"], "num_classes": num_classes}


def _load_trainer_state(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or "optimizer" not in state:
        raise ValueError(f"{path}: not an mdtrain finetune trainer-state checkpoint (last.ckpt)")
    return state


def _check_resumable(state: dict, cfg: FinetuneConfig, num_classes: int, path: str) -> None:
    old = state["config"]
    for key in ("model", "input_size", "global_pool", "norm", "batch_size", "epochs", "seed", "loader"):
        if old.get(key) != getattr(cfg, key):
            raise ValueError(f"--resume {path}: checkpoint has {key}={old.get(key)!r}, this run {getattr(cfg, key)!r}; "
                             f"an exact resume needs the same value")
    if state["num_classes"] != num_classes:
        raise ValueError(f"--resume {path}: checkpoint has {state['num_classes']} classes, this run {num_classes}")


def print_error(e: BaseException) -> None:
    """One red 'error:' line on stderr, never re-wrapped (paths in messages stay copyable)."""
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(e))}", highlight=False)


def run_command(fn: Callable[[Any], dict], cfg: Any) -> dict:
    """Run a finetune/eval/knn command: errors a user can fix print one line and exit 2; the process
    group is torn down either way."""
    from .ffcv_loader import FfcvMissing

    try:
        return fn(cfg)
    except (InitError, FfcvMissing, sources.SourceError, labelled.LabelError, ValueError, FileNotFoundError) as e:
        print_error(e)
        raise SystemExit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_cli(cfg: FinetuneConfig) -> None:
    result = run_command(finetune, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("epoch", "val_top1", "val_top5", "best_top1", "best_epoch")
        print(json.dumps({k: result[k] for k in keys if k in result}))
        sys.stdout.flush()
