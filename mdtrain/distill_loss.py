"""`mdtrain distill-loss`: a pretrained student's masked-feature loss on fresh crops of held-out images.

The direct measure of what a cache can lose: the same objective the student was trained on, computed
against the teacher run online on views the student never saw (a held-out split, crops and masks drawn
from `--seed`, identical for every student compared). A cached student that learned only its K stored
crops shows it here first, before any downstream accuracy does.

With `--cache` the crops are a cache's stored views instead (all K of each image, the teacher run in fp32
on them, not the stored targets): the loss on the crops a cached student trained on. Against the loss on
fresh crops of the same images (`--source` = the training images) it is the overfitting signal (Beyer et
al. saw students trained on precomputed teacher outputs overfit).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Optional

import torch

from mdcache.commands import ViewOptions, model_args_opt, opt, precision_opt, storage_options_opt
from mdcache.devices import resolve_precision, use_device
from mdcache.errors import ConfigError

from . import checkpoint, data
from .masking import scaled_min_patches
from .student import build_student


@dataclass
class DistillLossConfig(ViewOptions):
    """Held-out masked-feature loss of a pretrained student against its teacher, on fresh crops."""

    ckpt: str = opt("", "Pretraining checkpoint (OUT/last.ckpt of `mdtrain pretrain`): student, head, loss settings.",
                    required=True)
    source: str = opt("", "Held-out images: tar shards (brace pattern, glob, list) or an image folder (with --cache: "
                          "where the cache's images are, if they moved).")
    cache: Optional[str] = opt(None, "Use this cache's stored views (every one of its K views per image) instead of "
                                     "fresh crops of --source.")
    cache_views: int = opt(0, "With --cache: its first K stored views only (0: all it has), as `pretrain "
                              "--cache-views` trained on them.", ge=0)
    teacher: str = opt("", "The student's teacher (clip-b16, open_clip:ARCH[:TAG], timm:NAME).", required=True)
    teacher_weights: Optional[str] = opt(None, "Teacher weights file (.safetensors or weights-only .pth).")
    teacher_args: dict = model_args_opt("--teacher-arg", "teacher")
    random_init: bool = opt(False, "Randomly initialised teacher with --teacher-seed (tests only).")
    teacher_seed: int = opt(0, "Init seed of a --random-init teacher.", ge=0)
    tap: str = opt("final", "Teacher feature tap (final, ln_post, proj): the one the student was trained on.")
    head: int = opt(0, "Which head of a student of several teachers (--cache A --cache B): 0 = the first cache's "
                       "teacher's, i = the i-th other's; --teacher must be that head's teacher (targets on another "
                       "grid are resampled to the student's, as in training).", ge=0)
    seed: int = opt(12345, "Seed of the held-out crops and masks (keep it fixed across the students compared).", ge=0)
    batch_size: int = opt(128, "Images per batch (a last partial batch per loader worker is dropped).", ge=1)
    workers: int = opt(1, "Loader worker processes.", ge=0)
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    precision: str = precision_opt()
    storage_options: dict = storage_options_opt()


@torch.no_grad()
def distill_loss(cfg: DistillLossConfig) -> dict:
    """Mean masked-token loss (the pretraining objective, through pretrain's own `student_loss`) of --ckpt's
    student on fresh held-out crops, or on a cache's stored crops (--cache)."""
    from dataclasses import fields

    from mdcache import store
    from mdcache.teachers import load_teacher

    from .pretrain import PretrainConfig, Setup, student_loss

    if not cfg.ckpt or not cfg.teacher or not (cfg.source or cfg.cache):
        raise ConfigError("--ckpt, --teacher and --source (or --cache) are all required")
    if cfg.cache_views and not cfg.cache:
        raise ConfigError("--cache-views chooses among a cache's stored views: give --cache too")
    ckpt = checkpoint.load_trainer_state(cfg.ckpt, "pretrain")
    saved, grid, size = ckpt["config"], tuple(ckpt["grid"]), int(ckpt["image_size"])
    pcfg = PretrainConfig(**{f.name: saved[f.name] for f in fields(PretrainConfig) if f.name in saved
                             and f.name not in ("storage_options", "log")})
    device = use_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    state, dim = head_state(ckpt, cfg.head, cfg.ckpt)
    student = build_student(pcfg.student, image_size=size, grid=grid, teacher_dim=dim,
                            layer_scale=pcfg.layer_scale or None, model_args=pcfg.student_args or {})
    student.load_state_dict(state)  # the one head measured against --teacher
    student.to(device).eval()
    teacher = load_teacher(cfg.teacher, weights=cfg.teacher_weights, random_init=cfg.random_init, tap=cfg.tap,
                           image_size=head_image_size(saved, cfg.head, size, cfg.storage_options), device=device,
                           seed=cfg.teacher_seed, model_args=cfg.teacher_args)
    if teacher.image_size != size:
        raise ConfigError(f"--head {cfg.head}: teacher {cfg.teacher!r} takes {teacher.image_size} px images, the "
                          f"student {size} px; distill-loss replays views at the student's size only")
    if (tuple(teacher.patch_grid) != grid and cfg.head == 0) or teacher.dim != dim:
        raise ConfigError(f"teacher {cfg.teacher!r} gives {teacher.patch_grid} x {teacher.dim} targets, but head "
                          f"{cfg.head} of the student in {cfg.ckpt} was trained on {grid} x {dim}")
    cache = recipe = None
    if cfg.cache:  # the stored views: every view of every image, once (epochs 0..K-1 cycle through them)
        cache = store.open_cache(cfg.cache, cfg.storage_options)
        if cfg.cache_views > cache.views:
            raise ConfigError(f"--cache-views {cfg.cache_views}: {cache.url} stores {cache.views} views per image")
        plan, k, replay = data.plan_from_cache(cache, cfg.source or None), cfg.cache_views or cache.views, cache.replay
        epochs = k
    else:  # one fresh crop per held-out image
        recipe = replace(cfg, views=1).view_recipe(size, cfg.seed)
        plan, k, epochs, replay = data.plan_from_source(cfg.source, cfg.storage_options), 1, 1, recipe.replay
    stream_cfg = data.StreamConfig(batch_size=cfg.batch_size, image_size=size, grid=grid, views=k, seed=cfg.seed,
                                   mask_ratio=pcfg.mask_ratio, shuffle_buffer=1, lanes=max(1, cfg.workers),
                                   min_mask_patches=scaled_min_patches(grid[0] * grid[1], pcfg.min_mask_patches),
                                   with_targets=False, storage_options=cfg.storage_options, replay=replay)
    setup = Setup(plan=plan, stream=stream_cfg, cache=cache, recipe=recipe, dim=teacher.dim, teacher=teacher,
                  teacher_precision="fp32")
    total, images = 0.0, 0
    for epoch in range(epochs):
        for batch in data.make_loader(data.ShardStream(plan, stream_cfg, epoch=epoch, cache=cache, recipe=recipe),
                                      cfg.workers):
            batch = data.to_device(batch, device, stream_cfg)
            loss = student_loss(student, setup, batch, pcfg, precision, device)
            total += float(loss) * len(batch["keys"])
            images += len(batch["keys"])
    if not images:
        raise ConfigError(f"{cfg.cache or cfg.source}: no full batch of {cfg.batch_size} images; lower --batch-size")
    return {"loss": total / images, "images": images, "ckpt": cfg.ckpt, "step": ckpt["step"], "teacher": cfg.teacher,
            "head": cfg.head, "tap": cfg.tap, "seed": cfg.seed, "crops": "stored" if cache else "fresh",
            "views": k if cache else 1}


def head_state(ckpt: dict, head: int, path: str) -> tuple[dict, int]:
    """The student's weights with head `head` as its only head (0: the first teacher's), and its width."""
    model = ckpt["model"]
    extra = sorted({int(k.split(".")[1]) for k in model if k.startswith("extra_heads.")})
    if head > len(extra):
        raise ConfigError(f"--head {head}: the student in {path} has {1 + len(extra)} head(s) (0"
                          f"{'-' + str(len(extra)) if extra else ''})")
    state = {k: v for k, v in model.items() if not k.startswith(("extra_heads.", "head."))}
    src = "head." if head == 0 else f"extra_heads.{head - 1}."
    state.update({"head." + k[len(src):]: v for k, v in model.items() if k.startswith(src)})
    return state, int(state["head.weight"].shape[0])


def head_image_size(saved: dict, head: int, size: int, storage_options: dict) -> int:
    """The input size head `head`'s teacher ran at in training: its cache's (it may differ from the student's),
    or the student's (online, or a cache that cannot be opened here)."""
    caches = saved.get("cache") or []
    if head == 0 or head >= len(caches):
        return size
    from mdcache import store
    from mdcache.errors import UserError

    try:
        return store.open_cache(caches[head], storage_options).image_size
    except UserError:
        return size


def run_cli(cfg: DistillLossConfig) -> None:
    print(json.dumps(distill_loss(cfg)), flush=True)
