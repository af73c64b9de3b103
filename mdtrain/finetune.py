"""`mdtrain finetune`: a pretrained student backbone -> a measured classifier (BEiT v2 recipe defaults).

A flat loop in the style of facebookresearch/mae's main_finetune.py, with timm doing the parts
timm already does well: the model (drop path), layer-wise lr decay (create_optimizer_v2), the
cosine schedule with warmup, RandAugment + random erasing (create_transform), Mixup/CutMix with
label smoothing, and the model EMA. The same command without --init is the from-scratch baseline.

Outputs in --out: config.json, metrics.jsonl (one line per epoch), curves.png,
last.safetensors / best.safetensors (weights timm loads, model name in the metadata),
last.ckpt (full trainer state for --resume) and best.ckpt (the best epoch's metrics).
Every .ckpt loads with torch.load(weights_only=True): nothing is pickled but tensors and plain data.

Randomness is a function of (seed, epoch, rank, batch): each optimizer step reseeds the process
before it fetches its batch, so a run stopped after any step (--stop-after) resumes exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional

import torch
from rich.console import Console

from mdcache.commands import check_options, model_args_opt, opt, precision_opt, public_config, storage_options_opt
from mdcache.devices import autocast, grad_scaler, resolve_precision, use_device
from mdcache.errors import ConfigError
from mdcache.fs import fetch
from mdcache.progress import Meter, live_default

from . import labelled
from .checkpoint import (
    CKPT_NAME,
    check_resumable,
    load_trainer_state,
    resolve_resume,
    save_trainer_state,
    save_weights,
    weights_meta,
)
from .classifier import (
    DEFAULT_IMAGE_SIZE,
    build_model,
    describe_weights,
    evaluate_batches,
    layer_scale_of,
    load_backbone,
    scale_head,
)
from .outputs import MetricsLog, OutputDir, check_trackers, plot_curves
from .runtime import Dist, all_ranks, all_reduce_sum, init_distributed, make_deterministic, seed_all, seed_for, unwrap

console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
DEFAULT_MODEL = "vit_base_patch16_224"


@dataclass
class FinetuneConfig:
    """Finetune a timm classifier from a pretrained student backbone (BEiT v2 recipe defaults)."""

    train: str = opt("", "Labelled training data: WebDataset tars with .cls (brace pattern, glob, list), an image "
                         "folder with one sub-folder per class, or with --loader ffcv a .beton file.", required=True)
    val: str = opt("", "Labelled validation data (same forms as --train).", required=True)
    model: Optional[str] = opt(None, "timm model name. Default: the one --init's weights record (as knn and linprobe "
                                     "read it), else vit_base_patch16_224.")
    model_args: dict = model_args_opt("--model-arg", "model (default: those --init's weights record)")
    init: Optional[str] = opt(None, "Pretrained backbone (safetensors in timm naming, e.g. "
                                    "runs/pt/student.safetensors, or a .ckpt with a 'model' state dict). None: the "
                                    "from-scratch baseline.")
    out: str = opt("runs/ft", "Output directory or fsspec URL (remote: mirrored locally, uploaded after every epoch).")
    num_classes: Optional[int] = opt(None, "Number of classes; None = inferred from --train (class folders, or max "
                                           ".cls + 1).", ge=1)
    image_size: Optional[int] = opt(None, "Image side in pixels (ViTs get it as img_size; a pretrained pos-embed is "
                                          "resampled). Default: --init's recorded size, else 224.",
                          ge=1)
    global_pool: str = opt("avg", "timm global_pool: avg = mean of the patch tokens (BEiT v2's recipe: MaskDistill "
                                  "never trains the CLS token), token = the CLS token.")
    norm: str = opt("imagenet", "Input mean/std: imagenet (what mdtrain pretrain feeds the student) or model "
                                "(timm's config).")
    epochs: int = opt(100, "Training epochs.", ge=1)
    warmup_epochs: Optional[float] = opt(None, "Linear warmup epochs up to the peak lr, where the cosine starts (the "
                                               "lr is updated every step); less than --epochs. Default: BEiT v2's 20 "
                                               "of 100 epochs, a fifth of shorter runs (2 of 10), so a short run is "
                                               "mostly training, not warm-up.", ge=0)
    batch_size: int = opt(128, "Batch size per process (effective batch = batch-size x processes).", ge=1)
    blr: float = opt(1.25e-4, "Base learning rate per 256 images: lr = blr x effective batch / 256: 5e-4 at batch "
                              "1024, BEiT v2's value.", gt=0)
    lr: Optional[float] = opt(None, "Absolute peak learning rate; overrides --blr when given.", gt=0)
    min_lr: float = opt(1e-6, "Learning rate at the end of the cosine schedule.", ge=0)
    warmup_lr: float = opt(1e-6, "Learning rate at the start of warmup.", ge=0)
    weight_decay: float = opt(0.05, "AdamW weight decay (not applied to norms, biases, tokens, pos-embed).", ge=0)
    layer_decay: float = opt(0.65, "Layer-wise lr decay (BEiT); 1.0 = off.", gt=0, le=1)
    drop_path: float = opt(0.1, "Stochastic depth rate.", ge=0, lt=1)
    head_init_scale: float = opt(0.001, "With --init: multiply the new classifier's initial weight and bias by this "
                                        "(BEiT v2 init_scale: near-zero logits, so its first gradients do not "
                                        "disturb the pretrained backbone); 1 = timm's init. From scratch the head "
                                        "keeps timm's init (a near-zero head would starve the new backbone of "
                                        "gradient).", gt=0)
    clip_grad: Optional[float] = opt(None, "Clip the gradient norm to this value; None = off.", gt=0)
    smoothing: float = opt(0.1, "Label smoothing.", ge=0, lt=1)
    mixup: float = opt(0.8, "Mixup alpha; 0 = off.", ge=0)
    cutmix: float = opt(1.0, "CutMix alpha; 0 = off.", ge=0)
    mixup_prob: float = opt(1.0, "Probability of applying mixup or cutmix to a batch.", ge=0, le=1)
    mixup_switch_prob: float = opt(0.5, "Probability of cutmix instead of mixup when both are on.", ge=0, le=1)
    aa: str = opt("rand-m9-mstd0.5-inc1", "timm auto-augment policy (RandAugment); 'none' = off. Default loader only.")
    color_jitter: float = opt(0.4, "Color jitter (timm applies it only when --aa is off). Default loader only.", ge=0)
    reprob: float = opt(0.25, "Random erasing probability (both loaders).", ge=0, le=1)
    remode: str = opt("pixel", "Random erasing mode: const, rand, pixel.")
    recount: int = opt(1, "Random erasing count.", ge=1)
    crop_scale: tuple[float, float] = opt((0.08, 1.0), "RandomResizedCrop scale range: MIN MAX.", gt=0, le=1)
    crop_pct: float = opt(0.875, "Validation center-crop fraction (resize to image-size / crop-pct, crop image-size).",
                          gt=0, le=1)
    model_ema: bool = opt(False, "Keep an EMA of the weights (timm ModelEmaV3); evaluated and saved as "
                                 "ema.safetensors.")
    model_ema_decay: float = opt(0.9999, "EMA decay per step.", ge=0, lt=1)
    precision: str = precision_opt()
    loader: str = opt("default", "default (PIL decode + timm transforms, streams shards) or ffcv (.beton from "
                                 "ffcv-build).")
    workers: int = opt(4, "Data loading workers per process (threads for ffcv).", ge=0)
    train_size: Optional[int] = opt(None, "Training images per epoch for the per-step lr schedule; None = count "
                                          "(scans tar headers).", ge=1)
    shuffle_buffer: int = opt(1000, "Default loader: shuffle buffer size (samples).", ge=0)
    seed: int = opt(0, "Seed: model init, data order, augmentation (per epoch, rank and step, so --resume is exact).",
                    ge=0)
    resume: Optional[str] = opt(None, "Trainer-state checkpoint to continue from (OUT/last.ckpt); 'auto' = "
                                      "OUT/last.ckpt if present.")
    stop_after: Optional[int] = opt(None, "Stop after N optimizer steps of this run, with a checkpoint (--resume auto "
                                          "continues from exactly there). None = run to --epochs.", ge=0)
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N.")
    log_every: int = opt(20, "Print a progress line every N steps (rank 0); 0 = off.", ge=0)
    deterministic: bool = opt(False, "Deterministic GPU kernels (torch.use_deterministic_algorithms, cuBLAS "
                                     "workspace, no fused attention): exact resume on a GPU too, slower.")
    dist_timeout: float = opt(60.0, "Minutes a collective may wait under torchrun.", gt=0)
    log: list[str] = opt([], "Also log metrics to tensorboard (event files in OUT/tensorboard) or wandb (offline "
                             "unless WANDB_MODE=online) (repeatable); metrics.jsonl is always written.")
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE for remote sources (repeatable).")


def build_splits(cfg: FinetuneConfig, mean: tuple, std: tuple, dist: Dist,
                 device: torch.device) -> tuple[labelled.Split, labelled.Split]:
    """Train and val splits for --loader default or ffcv, with --num-classes inferred when None."""
    if cfg.loader == "ffcv":
        train = labelled.ffcv_train_split(cfg.train, cfg.batch_size, cfg.image_size, tuple(cfg.crop_scale), mean, std,
                                          cfg.workers, cfg.seed, dist.world, device, cfg.reprob, cfg.remode,
                                          cfg.recount, cfg.num_classes)
    elif cfg.loader == "default":
        t = labelled.train_transform(cfg.image_size, cfg.crop_scale, None if cfg.aa in ("", "none") else cfg.aa,
                                     cfg.color_jitter, cfg.reprob, cfg.remode, cfg.recount, mean, std)
        train = labelled.default_split(cfg.train, t, cfg.batch_size, cfg.workers, True, cfg.seed, cfg.num_classes,
                                       cfg.train_size, cfg.shuffle_buffer, cfg.storage_options,
                                       pin_memory=device.type == "cuda")
    else:
        raise ConfigError(f"--loader {cfg.loader!r}: expected default or ffcv")
    val = labelled.val_split(cfg.val, cfg.loader, cfg.image_size, cfg.crop_pct, mean, std, cfg.batch_size,
                             cfg.workers, train.num_classes, device, cfg.storage_options)
    return train, val


@dataclass
class Recipe:
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mixup: Any
    criterion: Callable
    lr: float
    scaler: Any = None  # GradScaler, enabled for fp16 only


def resolve_lr(cfg: FinetuneConfig, world: int) -> float:
    """Peak lr: --lr as given, else linear in the effective batch (BEiT v2's 5e-4 is absolute at batch 1024,
    so the default blr is 5e-4 / 4)."""
    return cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size * world / 256


def warmup_epochs(cfg: FinetuneConfig) -> float:
    """--warmup-epochs, or BEiT v2's 20 epochs capped at a fifth of the run."""
    return cfg.warmup_epochs if cfg.warmup_epochs is not None else min(20.0, cfg.epochs / 5)


def build_recipe(cfg: FinetuneConfig, net: torch.nn.Module, num_classes: int, world: int) -> Recipe:
    """AdamW with layer decay, per-step cosine schedule with warmup, mixup/cutmix and the matching loss.

    As BEiT v2's schedule: warmup reaches the peak lr, then the cosine starts from the peak (warmup_prefix)
    and spans the epochs left, ending at --min-lr on the last step."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    lr = resolve_lr(cfg, world)
    warmup = warmup_epochs(cfg)
    if warmup >= cfg.epochs:
        raise ConfigError(f"--warmup-epochs {warmup} must be less than --epochs {cfg.epochs}")
    optimizer = create_optimizer_v2(net, opt="adamw", lr=lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None,
                                    fused=next(net.parameters()).is_cuda)
    quiet = logging.getLogger("timm.scheduler.cosine_lr")  # its "will have no effect" warning for a one-epoch
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # cosine is wrong here: we step in fractional epochs
    try:
        scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs - warmup, lr_min=cfg.min_lr,
                                      warmup_t=warmup, warmup_lr_init=cfg.warmup_lr, warmup_prefix=True,
                                      t_in_epochs=True)
    finally:
        quiet.setLevel(level)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if cfg.batch_size % 2:
            raise ConfigError(f"--batch-size {cfg.batch_size}: mixup/cutmix need an even batch size")
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=num_classes)
        criterion: Callable = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    return Recipe(optimizer, scheduler, mixup, criterion, lr)


def max_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


@dataclass
class Run:
    """What the loop and its helpers share (pretrain's shape: one object, not a dozen arguments)."""

    cfg: FinetuneConfig
    dist: Dist
    device: torch.device
    precision: str
    model: torch.nn.Module  # DDP-wrapped under torchrun
    recipe: Recipe
    ema: Any
    steps_est: int  # batches per epoch per rank (the schedule's unit)
    layout: dict  # what exact resume needs unchanged
    meter: Any = None  # mdcache.progress.Meter: the bar or lines, images/s, loader wait

    @property
    def net(self) -> torch.nn.Module:
        return unwrap(self.model)


def train_one_epoch(run: Run, batches: Iterator, epoch: int, skip: int, budget: int | None) -> dict:
    """Train from batch `skip` of the epoch (the ones before were done by a run that stopped there) until the
    data ends on any rank or `budget` optimizer steps are done. Returns this rank's sums, not averages."""
    cfg, dist, device, precision, model, recipe, ema = (run.cfg, run.dist, run.device, run.precision, run.model,
                                                        run.recipe, run.ema)
    steps_est = run.steps_est
    model.train()
    it = iter(batches)
    for _ in range(skip):  # the order is a function of (seed, epoch, rank): skipping replays it exactly
        next(it, None)
    it, waited = run.meter.data(it), run.meter.waited_total
    run.meter.restart()  # the last epoch's evaluation and checkpoint are not this window's work
    n, done, images, ended, t0 = skip, 0, 0, False, time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # float64: a resumed epoch's sums add up exactly
    while budget is None or done < budget:
        seed_all(seed_for(cfg.seed, "finetune", epoch, dist.rank, n))  # before the fetch: in-process augmentation too
        batch = next(it, None)
        if not all_ranks(batch is not None, dist):  # DDP needs the same step count on every rank
            ended = True
            break
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True).long()
        recipe.scheduler.step(epoch + min(n / steps_est, 1.0))  # per-step lr, warmup in (fractional) epochs
        if recipe.mixup is not None:
            x, y = recipe.mixup(x, y)
        with autocast(device, precision):
            loss = recipe.criterion(model(x), y)
        recipe.optimizer.zero_grad(set_to_none=True)
        recipe.scaler.scale(loss).backward()
        if cfg.clip_grad:
            recipe.scaler.unscale_(recipe.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        recipe.scaler.step(recipe.optimizer)
        recipe.scaler.update()
        if ema is not None:
            ema.update(unwrap(model))
        loss_sum, images, n, done = loss_sum + loss.detach().double(), images + len(x), n + 1, done + 1  # on device
        run.meter.count(len(x) * dist.world)
        run.meter.advance()
        if cfg.log_every and n % cfg.log_every == 0:  # a logging step: the one read from the device
            check_finite(loss_sum / done, epoch, n)
            run.meter.report(epoch=epoch + n / steps_est, loss=float(loss.detach()), lr=max_lr(recipe.optimizer))
    loss_sum = float(loss_sum)
    check_finite(loss_sum, epoch, n)
    seconds = time.perf_counter() - t0
    return {"ended": ended, "batch_in_epoch": n, "done": done, "sums": [loss_sum, done, images], "seconds": seconds,
            "data_wait": round(min((run.meter.waited_total - waited) / max(seconds, 1e-9), 1.0), 4)}


def check_finite(loss: Any, epoch: int, step: int) -> None:
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"loss is {float(loss)} at epoch {epoch} step {step}; stopping")


def trainer_state(run: Run, pos: dict) -> dict:
    """last.ckpt: everything --resume needs, tensors and plain data only."""
    r, ema = run.recipe, run.ema
    return {**pos, "model": run.net.state_dict(), "optimizer": r.optimizer.state_dict(),
            "scheduler": r.scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "scaler": r.scaler.state_dict() if r.scaler.is_enabled() else None,
            "layout": run.layout, "config": public_config(run.cfg)}


def save_epoch(outdir: OutputDir, net: torch.nn.Module, ema: Any, state: dict, row: dict, is_best: bool, meta: dict,
               log: MetricsLog, rows: list[dict]) -> None:
    """Rank 0, after an epoch: weights, trainer state, metrics row, curves; then upload a remote --out."""
    epoch = row["epoch"]
    save_weights(outdir.path("last.safetensors"), net.state_dict(), {**meta, "epoch": epoch})
    if ema is not None:
        save_weights(outdir.path("ema.safetensors"), ema.module.state_dict(), {**meta, "epoch": epoch, "ema": True})
    if is_best:
        save_weights(outdir.path("best.safetensors"), net.state_dict(), {**meta, "epoch": epoch})
        save_trainer_state(outdir.path("best.ckpt"), "finetune-best",
                           {"epoch": epoch, "metrics": row, "config": state["config"]})
    save_trainer_state(outdir.path(CKPT_NAME), "finetune", state)
    log.write(row)
    plot_curves(rows, outdir.path("curves.png"))
    outdir.push()


def resolve_model(cfg: FinetuneConfig) -> FinetuneConfig:
    """--model, --model-arg and --image-size default to what --init's weights record (a pretrained student
    records all three); explicit options win; without a record, vit_base_patch16_224 at 224 px."""
    found: dict = {"meta": {}}  # describe_weights: explicit options win over what the weights record
    if cfg.init:
        try:
            found = describe_weights(fetch(cfg.init, cfg.storage_options), cfg.model, cfg.image_size,
                                     model_args=cfg.model_args or None)
        except ConfigError as e:
            if "no such weights file" in str(e):
                raise
    recorded = found["meta"].get("model") or found["meta"].get("timm_model")
    same = not cfg.model or cfg.model == recorded  # recorded arguments belong to the recorded model only
    return replace(cfg, model=cfg.model or found.get("model") or DEFAULT_MODEL,
                   model_args=cfg.model_args or (found.get("model_args", {}) if same else {}),
                   image_size=cfg.image_size or found.get("image_size") or DEFAULT_IMAGE_SIZE)


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a finetune; returns the last epoch's metrics plus the best top-1."""
    from timm.utils import ModelEmaV3

    if not cfg.train or not cfg.val:
        raise ConfigError("--train and --val are both required")
    check_options(cfg)
    cfg = resolve_model(cfg)
    check_trackers(cfg.log)
    device = use_device(cfg.device)
    if cfg.deterministic:
        make_deterministic()
    dist = init_distributed(device, cfg.dist_timeout)
    precision = resolve_precision(cfg.precision, device)
    outdir = OutputDir(cfg.out, cfg.storage_options)  # local, or mirrored to a URL
    resume = resolve_resume(cfg.resume, outdir.local)
    state = load_trainer_state(resume, "finetune") if resume else None

    mean, std = labelled.data_config(cfg.model, cfg.norm)
    train, val = build_splits(cfg, mean, std, dist, device)
    num_classes = train.num_classes
    seed_all(cfg.seed)
    init = fetch(cfg.init, cfg.storage_options) if cfg.init else None
    layer_scale = layer_scale_of(init) if init else None
    model = build_model(cfg.model, num_classes, cfg.image_size, cfg.drop_path, cfg.global_pool, layer_scale,
                        cfg.model_args)
    if state is None and init:  # a fresh head on a pretrained backbone (a resume loads its trained one)
        scale_head(model, cfg.head_init_scale)
    if init and state is None:
        report = load_backbone(model, init)
        if dist.main:
            console.print(f"init: {report['loaded']} tensors from {cfg.init}; missing (new classifier): "
                          f"{', '.join(report['missing']) or 'none'}; unexpected: none"
                          + "".join(f"; {n}" for n in report["notes"]))
    model.to(device)
    if dist.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    net = unwrap(model)
    ema = ModelEmaV3(net, decay=cfg.model_ema_decay) if cfg.model_ema else None
    recipe = build_recipe(cfg, net, num_classes, dist.world)
    recipe.scaler = grad_scaler(device, precision)

    layout = {k: getattr(cfg, k) for k in ("model", "model_args", "image_size", "global_pool", "norm", "batch_size",
                                           "epochs",
                                           "seed", "loader")}
    layout.update(num_classes=num_classes, world=dist.world)
    pos = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "partial": [0.0, 0.0, 0.0],
           "best": {"val_top1": -1.0, "epoch": -1}}
    log = MetricsLog(outdir.path("metrics.jsonl"), tuple(cfg.log) if dist.main else (),
                     os.path.basename(cfg.out.rstrip("/")), public_config(cfg))
    if state is not None:
        mid_epoch = state["batch_in_epoch"] > 0  # the skipped batches are this world's: it must not change
        check_resumable(state["layout"], {k: v for k, v in layout.items() if k != "world" or mid_epoch}, resume)
        net.load_state_dict(state["model"])
        recipe.optimizer.load_state_dict(state["optimizer"])
        recipe.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            recipe.scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        pos = {k: state[k] for k in pos}
        if not dist.main:  # rank 0 carries the partial epoch's sums, already summed over ranks
            pos["partial"] = [0.0, 0.0, 0.0]
        if dist.main:
            console.print(f"resumed from {resume} at epoch {pos['epoch']}, batch {pos['batch_in_epoch']}")
    rows = log.truncate(lambda row: state is not None and row["epoch"] < pos["epoch"]) if dist.main else []
    steps_est = labelled.batches_per_epoch(train.samples, cfg.batch_size, dist.world)
    run = Run(cfg, dist, device, precision, model, recipe, ema, steps_est, layout)
    meta = weights_meta("classifier", cfg.model, cfg.image_size, mean, std, cfg.model_args, layer_scale,
                        num_classes=num_classes, crop_pct=cfg.crop_pct, global_pool=cfg.global_pool or None)
    if dist.main:
        with open(outdir.path("config.json"), "w") as f:
            json.dump({**public_config(cfg), "resolved": {**meta, "lr": recipe.lr, "world": dist.world,
                       "effective_batch": cfg.batch_size * dist.world, "precision": precision,
                       "train_samples": train.samples}}, f, indent=1)
        console.print(f"finetune {cfg.model}: {num_classes} classes, {train.samples} train images, effective batch "
                      f"{cfg.batch_size * dist.world}, lr {recipe.lr:.2e}, ~{steps_est} steps/epoch, {precision}, "
                      f"{device}")

    row: dict = {}
    budget = cfg.stop_after  # optimizer steps left in this run (None: no limit)
    run.meter = Meter("finetune", "steps", cfg.epochs * steps_est, pos["step"], live=dist.main and live_default(),
                      quiet=not dist.main or not cfg.log_every, console=console,
                      fields={"epoch": "epoch {:.2f}", "loss": "loss {:.4f}", "lr": "lr {:.2e}"})
    with run.meter:
        while pos["epoch"] < cfg.epochs:
            epoch = pos["epoch"]
            s = train_one_epoch(run, train.batches(epoch), epoch, pos["batch_in_epoch"], budget)
            budget = None if budget is None else budget - s["done"]
            sums = [a + b for a, b in zip(pos["partial"], s["sums"])]
            pos.update(step=pos["step"] + s["done"])
            if not s["ended"]:  # --stop-after reached mid-epoch: save where we are, with the epoch's sums so far
                pos.update(batch_in_epoch=s["batch_in_epoch"], partial=all_reduce_sum(sums, dist))
                if dist.main:
                    save_trainer_state(outdir.path(CKPT_NAME), "finetune", trainer_state(run, pos))
                    outdir.push()
                    console.print(f"stopped after {pos['step']} steps (epoch {epoch}, batch {pos['batch_in_epoch']}); "
                                  f"--resume auto continues")
                break
            loss_sum, steps, images = all_reduce_sum(sums, dist)
            if steps == 0:
                raise ConfigError(f"epoch {epoch}: no training batch (fewer than --batch-size {cfg.batch_size} images "
                                  f"per process in --train?)")
            v = evaluate_batches(model, val.batches(epoch), device, precision, dist)
            row = {"epoch": epoch, "train_loss": loss_sum / steps, "lr": max_lr(recipe.optimizer),
                   "steps": int(steps // dist.world), "images": int(images), "train_seconds": s["seconds"],
                   "data_wait": s["data_wait"],
                   "val_top1": v["top1"], "val_top5": v["top5"], "val_loss": v["loss"], "val_n": v["n"]}
            if ema is not None:
                e = evaluate_batches(ema.module, val.batches(epoch), device, precision, dist)
                row.update(ema_top1=e["top1"], ema_top5=e["top5"])
            is_best = row["val_top1"] > pos["best"]["val_top1"]
            if is_best:
                pos["best"] = {"val_top1": row["val_top1"], "val_top5": row["val_top5"], "epoch": epoch}
            pos.update(epoch=epoch + 1, batch_in_epoch=0, partial=[0.0, 0.0, 0.0])
            if dist.main:
                rows.append(row)
                save_epoch(outdir, net, ema, trainer_state(run, pos), row, is_best, meta, log, rows)
                best = pos["best"]
                console.print(f"epoch {epoch}: train loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, val top-1 "
                              f"{row['val_top1']:.2f} top-5 {row['val_top5']:.2f} (best {best['val_top1']:.2f} @ "
                              f"{best['epoch']})" + (f", ema top-1 {row['ema_top1']:.2f}" if ema is not None else ""))
            if dist.world > 1:
                torch.distributed.barrier()
    log.close()
    return {**row, "best_top1": pos["best"]["val_top1"], "best_epoch": pos["best"]["epoch"],
            "num_classes": num_classes, "step": pos["step"]}


def run_cli(cfg: FinetuneConfig) -> None:
    result = finetune(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("epoch", "val_top1", "val_top5", "best_top1", "best_epoch", "step")
        print(json.dumps({k: result[k] for k in keys if k in result}), flush=True)
