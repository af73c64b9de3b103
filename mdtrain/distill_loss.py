"""`mdtrain distill-loss`: a pretrained student's masked-feature loss on fresh crops of held-out images.

The direct measure of what a cache can lose: the same objective the student was trained on, computed
against the teacher run online on views the student never saw (a held-out split, crops and masks drawn
from `--seed`, identical for every student compared). A cached student that learned only its K stored
crops shows it here first, before any downstream accuracy does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Optional

import torch

from mdcache.commands import ViewOptions, model_args_opt, opt, precision_opt, storage_options_opt
from mdcache.devices import autocast, resolve_precision, use_device
from mdcache.errors import ConfigError

from . import checkpoint, data, objective
from .masking import scaled_min_patches
from .student import build_student


@dataclass
class DistillLossConfig(ViewOptions):
    """Held-out masked-feature loss of a pretrained student against its teacher, on fresh crops."""

    ckpt: str = opt("", "Pretraining checkpoint (OUT/last.ckpt of `mdtrain pretrain`): student, head, loss settings.",
                    required=True)
    source: str = opt("", "Held-out images: tar shards (brace pattern, glob, list) or an image folder.", required=True)
    teacher: str = opt("", "The student's teacher (clip-b16, open_clip:ARCH[:TAG], timm:NAME).", required=True)
    teacher_weights: Optional[str] = opt(None, "Teacher weights file (.safetensors or weights-only .pth).")
    teacher_args: dict = model_args_opt("--teacher-arg", "teacher")
    random_init: bool = opt(False, "Randomly initialised teacher with --teacher-seed (tests only).")
    teacher_seed: int = opt(0, "Init seed of a --random-init teacher.", ge=0)
    tap: str = opt("final", "Teacher feature tap (final, ln_post, proj): the one the student was trained on.")
    seed: int = opt(12345, "Seed of the held-out crops and masks (keep it fixed across the students compared).", ge=0)
    batch_size: int = opt(128, "Images per batch (a last partial batch per loader worker is dropped).", ge=1)
    workers: int = opt(1, "Loader worker processes.", ge=0)
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    precision: str = precision_opt()
    storage_options: dict = storage_options_opt()


@torch.no_grad()
def distill_loss(cfg: DistillLossConfig) -> dict:
    """Mean masked-token loss (the pretraining objective) of --ckpt's student on fresh held-out crops."""
    from mdcache.teachers import load_teacher, run_teacher

    if not cfg.ckpt or not cfg.source or not cfg.teacher:
        raise ConfigError("--ckpt, --source and --teacher are all required")
    ckpt = checkpoint.load_trainer_state(cfg.ckpt, "pretrain")
    pcfg, grid, size = ckpt["config"], tuple(ckpt["grid"]), int(ckpt["image_size"])
    device = use_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    student = build_student(pcfg["student"], image_size=size, grid=grid, teacher_dim=int(ckpt["teacher_dim"]),
                            layer_scale=pcfg.get("layer_scale") or None, model_args=pcfg.get("student_args") or {})
    student.load_state_dict(ckpt["model"])
    student.to(device).eval()
    teacher = load_teacher(cfg.teacher, weights=cfg.teacher_weights, random_init=cfg.random_init, tap=cfg.tap,
                           image_size=size, device=device, seed=cfg.teacher_seed, model_args=cfg.teacher_args)
    if tuple(teacher.patch_grid) != grid or teacher.dim != int(ckpt["teacher_dim"]):
        raise ConfigError(f"teacher {cfg.teacher!r} gives {teacher.patch_grid} x {teacher.dim} targets, but the "
                          f"student in {cfg.ckpt} was trained on {grid} x {ckpt['teacher_dim']}")
    recipe = replace(cfg, views=1).view_recipe(size, cfg.seed)  # one fresh crop per held-out image
    plan = data.plan_from_source(cfg.source, cfg.storage_options)
    stream_cfg = data.StreamConfig(batch_size=cfg.batch_size, image_size=size, grid=grid, views=1, seed=cfg.seed,
                                   mask_ratio=pcfg["mask_ratio"], shuffle_buffer=1, lanes=max(1, cfg.workers),
                                   min_mask_patches=scaled_min_patches(grid[0] * grid[1], pcfg["min_mask_patches"]),
                                   with_targets=False, storage_options=cfg.storage_options, replay=recipe.replay)
    stream = data.ShardStream(plan, stream_cfg, epoch=0, recipe=recipe)
    total, images = 0.0, 0
    for batch in data.make_loader(stream, cfg.workers):
        batch = data.to_device(batch, device, stream_cfg)
        targets = run_teacher(teacher, batch["images"], "fp32")
        with autocast(device, precision):
            pred = student(data.normalize(batch["images"], data.STUDENT_MEAN, data.STUDENT_STD), batch["mask"])
        loss = objective.distill_loss(pred.float(), targets, batch["mask"], target_norm=pcfg["target_norm"],
                                      loss=pcfg["loss"], beta=pcfg["beta"])
        total += float(loss) * len(batch["keys"])
        images += len(batch["keys"])
    if not images:
        raise ConfigError(f"--source {cfg.source}: no full batch of {cfg.batch_size} images; lower --batch-size")
    return {"loss": total / images, "images": images, "ckpt": cfg.ckpt, "step": ckpt["step"], "teacher": cfg.teacher,
            "tap": cfg.tap, "seed": cfg.seed}


def run_cli(cfg: DistillLossConfig) -> None:
    print(json.dumps(distill_loss(cfg)), flush=True)
