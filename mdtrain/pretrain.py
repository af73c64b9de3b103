"""`mdtrain pretrain`: MaskDistill pretraining from an mdcache cache, with no teacher in memory.

A flat loop in the style of facebookresearch/mae: build data, student, optimizer and schedule;
for each epoch stream batches, regress the (decoded, normalized) teacher targets on masked tokens,
step, log, checkpoint. `--teacher` switches to the online baseline: the teacher runs in the loop
on exactly the views and masks the offline run would use. mdcache.teachers (and open_clip) are
imported only in that mode.
"""
from __future__ import annotations

import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from rich.console import Console

from mdcache import store, views
from mdcache.commands import (
    ViewOptions,
    check_options,
    model_args_opt,
    opt,
    precision_opt,
    public_config,
    storage_options_opt,
)
from mdcache.devices import autocast, grad_scaler, resolve_precision, use_device
from mdcache.errors import ConfigError
from mdcache.progress import Meter

from . import checkpoint, data, objective
from .masking import DEFAULT_MASK_RATIO, DEFAULT_MIN_PATCHES, scaled_min_patches
from .outputs import MetricsLog, OutputDir, check_trackers, plot_loss
from .runtime import (
    Dist,
    StopFlag,
    any_rank,
    configure_threads,
    control_group,
    ignore_sigint,
    init_distributed,
    make_deterministic,
    means_over_ranks,
    unwrap,
)
from .student import Student, build_student

console = Console(stderr=True, soft_wrap=True)  # log files: no line breaks mid-sentence


@dataclass
class PretrainConfig(ViewOptions):
    """MaskDistill pretraining of a timm ViT from cached teacher targets (or an online teacher).

    The view options (--views ... --color-jitter) apply to online mode without a cache; a cache brings its own."""

    cache: list[str] = opt([], "Cache directory (<root>/<cache-id>) made by `mdcache extract`, local path or fsspec "
                               "URL. Repeatable: caches of several teachers on the same views (`mdcache extract "
                               "--views-of`) train one student with one head per teacher; the first cache's images "
                               "and patch grid are the student's, the others' targets are resampled to it.",
                           group="Data")
    source: Optional[str] = opt(None, "Source shards: overrides where the cache's images are; required online "
                                      "without --cache.", group="Data")
    cache_views: int = opt(0, "With --cache: train on its first K stored views only (0: all it has). Views are "
                              "nested, so K=2 of a grown K=8 cache is the K=2 cache.", ge=0, group="Data")
    student: str = opt("vit_base_patch16_224", "timm model name of the student (vit_*, deit_*, beitv2_*, ...).",
                       group="Student")
    student_args: dict = model_args_opt("--student-arg", "student", group="Student")
    out: str = opt("runs/pretrain", "Output directory or fsspec URL (remote: mirrored locally, uploaded after every "
                                    "checkpoint): metrics.jsonl, last.ckpt, student.safetensors, loss.png.",
                   group="Run")
    epochs: int = opt(300, "Epochs (passes over the cache; each uses one stored view per image).",
                      ge=1, group="Optimization")
    batch_size: int = opt(256, "Images per process per micro-step (effective batch = this x accum-iter x processes).",
                          ge=1, group="Optimization")
    accum_iter: int = opt(1, "Micro-steps accumulated per optimizer step.", ge=1, group="Optimization")
    blr: float = opt(1.875e-4, "Base learning rate: lr = blr x effective batch / 256 (MaskDistill: 1.5e-3 at "
                               "batch 2048).", gt=0, group="Optimization")
    lr: Optional[float] = opt(None, "Absolute peak learning rate (overrides --blr).", gt=0, group="Optimization")
    min_lr: float = opt(1e-5, "Learning rate at the end of the cosine schedule.", ge=0, group="Optimization")
    warmup_epochs: int = opt(10, "Linear warmup epochs.", ge=0, group="Optimization")
    weight_decay: float = opt(0.05, "AdamW weight decay (none on norms, biases, position/cls/mask tokens).",
                              ge=0, group="Optimization")
    betas: Optional[tuple[float, float]] = opt(None, "AdamW betas B1 B2 (default: BEiT v2's rule, 0.9 0.98 for runs "
                                                     "up to 300 epochs, 0.9 0.999 for longer ones).",
                                               ge=0, lt=1, group="Optimization")
    clip_grad: float = opt(3.0, "Gradient norm clipping (0 disables).", ge=0, group="Optimization")
    drop_path: Optional[float] = opt(None, "Stochastic depth rate of the student (default: BEiT v2's rule, 0.0 for "
                                           "runs up to 300 epochs, 0.1 for longer ones).", ge=0, lt=1, group="Student")
    layer_scale: Optional[float] = opt(None, "LayerScale init value (timm init_values; default: 0.1, or 1e-5 for "
                                             "large/huge/giant students; 0: no LayerScale).", ge=0, group="Student")
    mask_ratio: float = opt(DEFAULT_MASK_RATIO, "Fraction of patches masked (exactly round(ratio x patches)); "
                                                "75/196 by default.", shown="75/196", gt=0, lt=1, group="Objective")
    min_mask_patches: int = opt(DEFAULT_MIN_PATCHES, "Smallest mask block on a 196-patch grid (scaled to the "
                                                     "cache's grid).", ge=1, group="Objective")
    target_norm: str = opt("layernorm", "Target normalization: layernorm (per token, no affine) or none.",
                           group="Objective")
    loss: str = opt("smooth_l1", "Loss on masked tokens: smooth_l1, mse or cosine.", group="Objective")
    beta: float = opt(2.0, "Smooth-L1 beta (OPEN in MaskDistill: 1.0 or 2.0).", gt=0, group="Objective")
    teacher_weight: list[float] = opt([], "With several --cache: each teacher's loss weight, in --cache order "
                                          "(repeatable; default 1 each). The loss is the weighted sum of the "
                                          "per-teacher losses on the same masked tokens.", ge=0, group="Objective")
    seed: int = opt(0, "Seed: shard order, shuffle, view choice, masks, init (online without a cache: also views).",
                    ge=0, group="Run")
    workers: int = opt(2, "Loader worker processes per rank (exact resume needs the same number).", ge=0, group="Data")
    shuffle_buffer: int = opt(256, "Shuffle buffer size inside each shard (samples).", ge=1, group="Data")
    device: str = opt("auto", "Device: auto (CUDA at LOCAL_RANK if available, else CPU), cpu, cuda, cuda:N.",
                      group="Run")
    precision: str = precision_opt(group="Run")
    resume: Optional[str] = opt(None, "Resume from a last.ckpt (or 'auto': OUT/last.ckpt if it exists).", group="Run")
    save_every: Optional[int] = opt(None, "Also checkpoint every N optimizer steps (default: at the end of each "
                                          "epoch only).", ge=1, group="Run")
    log_every: int = opt(10, "Log every N optimizer steps, and the last (0: only the last): a logged step reads the "
                             "loss from the device, the only host-device sync of a step.", ge=0, group="Run")
    log: list[str] = opt([], "Also log metrics to tensorboard (event files in OUT/tensorboard) or wandb (offline "
                             "unless WANDB_MODE=online) (repeatable); metrics.jsonl is always written.", group="Run")
    stop_after: Optional[int] = opt(None, "Stop after N optimizer steps in this process, with a checkpoint "
                                          "(default: run to the end).", ge=0, group="Run")
    log_samples: bool = opt(False, "Write OUT/samples-rank<R>.jsonl: the keys of every batch (audit data order).",
                            group="Run")
    progress: bool = opt(True, "Rich progress bar on rank 0 (when stderr is a terminal).", group="Run")
    deterministic: bool = opt(False, "Deterministic GPU kernels (torch.use_deterministic_algorithms, cuBLAS workspace, "
                                     "no fused attention): exact resume and online == offline on a GPU too, slower.",
                              group="Run")
    dist_timeout: float = opt(60.0, "Minutes a collective may wait under torchrun (rank 0 saves and uploads "
                                    "checkpoints while the others wait; NCCL's own default is 10).", gt=0, group="Run")
    teacher: list[str] = opt([], "Online mode: run this teacher in the loop (clip-b16, open_clip:ARCH[:TAG], "
                                 "timm:NAME). Repeatable with several --cache: one per cache, in order, each run on "
                                 "its cache's views (the online side of the multi-teacher equivalence).",
                             group="Online teacher")
    teacher_weights: list[str] = opt([], "Online mode: local teacher weights file (repeatable: in --teacher order).",
                                     group="Online teacher")
    teacher_args: dict = model_args_opt("--teacher-arg", "online teacher (timm teachers)", group="Online teacher")
    fresh_crops: bool = opt(False, "Online mode without a cache: draw a NEW crop (and jitter) of every image every "
                                   "epoch, a pure function of (seed, epoch, key) - the paper's recipe, the reference "
                                   "a cached run is compared with. Without it, online mode replays --views views.",
                            group="Online teacher")
    random_init: bool = opt(False, "Online mode: randomly initialised teacher (tests/benchmarks only).",
                            group="Online teacher")
    teacher_seed: int = opt(0, "Online mode: init seed of a --random-init teacher (with a cache: the cache's).",
                            ge=0, group="Online teacher")
    tap: str = opt("final", "Online mode without a cache: teacher feature tap (final, ln_post, proj).",
                   group="Online teacher")
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE for cache and source (repeatable).",
                                                group="Data")
    local_cache: Optional[str] = opt(None, "Local directory for a read-through copy of a remote cache: each shard "
                                           "is downloaded once per machine.", group="Data")
    local_cache_gb: float = opt(100.0, "Size bound of --local-cache in GB (least recently used shards are evicted).",
                                gt=0, group="Data")


    def __post_init__(self) -> None:  # one cache or teacher may be given as a string (Python callers, old configs)
        for name in ("cache", "teacher", "teacher_weights"):
            value = getattr(self, name)
            setattr(self, name, [] if value is None else [value] if isinstance(value, str) else list(value))


def check_config(cfg: PretrainConfig) -> None:
    check_options(cfg)
    objective.check(cfg.target_norm, cfg.loss)
    check_trackers(cfg.log)
    if cfg.fresh_crops and (cfg.cache or not cfg.teacher):
        raise ConfigError("--fresh-crops is online mode without a cache: give --teacher and --source (and the view "
                          "options of the cache you compare with), not --cache")
    if cfg.teacher_weight and len(cfg.teacher_weight) != len(cfg.cache):
        raise ConfigError(f"--teacher-weight given {len(cfg.teacher_weight)} time(s) for {len(cfg.cache)} --cache: "
                          "one weight per cache, in order")
    if (len(cfg.teacher) > 1 or (cfg.teacher and len(cfg.cache) > 1)) and len(cfg.teacher) != len(cfg.cache):
        raise ConfigError(f"{len(cfg.teacher)} --teacher for {len(cfg.cache)} --cache: several online teachers run "
                          "on the views of their caches, one --teacher per --cache, in order")
    if len(cfg.teacher_weights) > max(1, len(cfg.teacher)):
        raise ConfigError(f"{len(cfg.teacher_weights)} --teacher-weights for {len(cfg.teacher)} --teacher")


LONG_RUN_EPOCHS = 300  # BEiT v2's rule: up to 300 epochs betas (0.9, 0.98) and no drop path; longer: 0.999 and 0.1


def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """Fill the recipe defaults that depend on the run (MaskDistill on BEiT v2): LayerScale 0.1 (1e-5 for
    large students), and BEiT v2's epoch rule for AdamW betas and drop path. Explicit values win."""
    big = any(s in cfg.student for s in ("large", "huge", "giant")) or int(cfg.student_args.get("embed_dim", 0)) >= 1024
    short = cfg.epochs <= LONG_RUN_EPOCHS
    return replace(cfg, layer_scale=cfg.layer_scale if cfg.layer_scale is not None else (1e-5 if big else 0.1),
                   betas=tuple(cfg.betas) if cfg.betas is not None else ((0.9, 0.98) if short else (0.9, 0.999)),
                   drop_path=cfg.drop_path if cfg.drop_path is not None else (0.0 if short else 0.1))


# ----------------------------------------------------------------------------- data and targets

@dataclass
class ExtraTeacher:
    """A second (third, ...) teacher of a multi-teacher run: its cache (targets on the first cache's views), its
    own head of `dim` outputs and loss weight, its grid (targets are resampled to the student's), and online
    its model."""

    cache: store.Cache
    weight: float = 1.0
    teacher: Any = None

    @property
    def dim(self) -> int:
        return self.cache.teacher_dim

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.cache.patch_grid)


@dataclass
class Setup:
    """Everything the loop needs that comes from the cache (or, online, from the teacher)."""

    plan: list[data.ShardPlan]
    stream: data.StreamConfig
    cache: store.Cache | None
    recipe: views.ViewRecipe | None
    dim: int
    teacher: Any = None                    # mdcache.teachers.Teacher in online mode
    teacher_precision: str = "fp32"
    weight: float = 1.0                    # the first teacher's loss weight
    extra: list[ExtraTeacher] = field(default_factory=list)

    @property
    def teachers(self) -> list[dict]:
        """Every teacher of the run, as config.json records them."""
        first = {"cache_id": self.cache.cache_id if self.cache else None, "grid": list(self.stream.grid),
                 "dim": self.dim, "weight": self.weight}
        return [first, *({"cache_id": e.cache.cache_id, "grid": list(e.grid), "dim": e.dim, "weight": e.weight,
                          "targets": "as stored" if tuple(e.grid) == tuple(self.stream.grid) else
                          f"bilinear {e.grid[0]}x{e.grid[1]} -> {self.stream.grid[0]}x{self.stream.grid[1]}"}
                         for e in self.extra)]


def setup_data(cfg: PretrainConfig, device: torch.device, dist: Dist | None = None, with_targets: bool = True) -> Setup:
    """Open the cache and plan the stream; in online mode also load the teacher (lazily imported)."""
    dist = dist or Dist()
    so = cfg.storage_options
    cache = recipe = teacher = None
    extra: list[ExtraTeacher] = []
    if cfg.cache:
        bound = int(cfg.local_cache_gb * 2**30)
        caches = [store.open_cache(c, so, local_cache=cfg.local_cache, local_cache_bytes=bound) for c in cfg.cache]
        for c in caches:
            _ = c.calibration  # read and checked now (pca's basis): a damaged one stops here, by name
        cache = caches[0]
        plan = data.plan_from_cache(cache, cfg.source)
        weights = cfg.teacher_weight or [1.0] * len(caches)
        extra = [ExtraTeacher(c, float(w)) for c, w in zip(caches[1:], weights[1:])]
        check_lined_up(cache, plan, [e.cache for e in extra])
        grid, dim, image_size = cache.patch_grid, cache.teacher_dim, cache.image_size
        k = min(c.views for c in caches)
        if cfg.cache_views > k:
            fewest = min(caches, key=lambda c: c.views)
            raise ConfigError(f"--cache-views {cfg.cache_views}: {fewest.url} stores {k} views per image (grow it "
                              f"with `mdcache extract ... --views {cfg.cache_views}`)")
        k = cfg.cache_views or k
    elif cfg.teacher and cfg.source:
        plan = data.plan_from_source(cfg.source, so)
    else:
        raise ConfigError("give --cache (offline), or --teacher with --source (online without a cache)")
    if cfg.teacher:
        teacher = load_online_teacher(cfg, cache, device)
        for j, e in enumerate(extra, 1):
            if e.cache.image_size != cache.image_size:
                raise ConfigError(f"online teacher {j + 1} ({cfg.teacher[j]}): its cache {e.cache.url} is at "
                                  f"{e.cache.image_size} px, the first at {cache.image_size} px; online, every teacher "
                                  "sees the student's pixels (train from the caches instead)")
            e.teacher = load_online_teacher(cfg, e.cache, device, j)
        if cache is None:
            grid, dim, image_size, k = tuple(teacher.patch_grid), teacher.dim, teacher.image_size, cfg.views
            recipe = cfg.view_recipe(image_size, cfg.seed)
    scfg = data.StreamConfig(batch_size=cfg.batch_size, image_size=image_size, grid=grid, views=k, seed=cfg.seed,
                             mask_ratio=cfg.mask_ratio,
                             min_mask_patches=scaled_min_patches(grid[0] * grid[1], cfg.min_mask_patches),
                             shuffle_buffer=cfg.shuffle_buffer, rank=dist.rank, world=dist.world,
                             lanes=max(1, cfg.workers), with_targets=with_targets and teacher is None,
                             fresh_crops=cfg.fresh_crops, storage_options=so,
                             replay=cache.replay if cache is not None else recipe.replay,
                             replay_on=views.check_replay_on(cfg.replay_on, cache.replay if cache is not None
                                                             else recipe.replay))
    if cache is not None and dist.main:
        check_decoder(cache, cfg.replay_on, device)
    return Setup(plan=plan, stream=scfg, cache=cache, recipe=recipe, dim=dim, teacher=teacher,
                 teacher_precision=resolve_precision(cfg.precision, device),
                 weight=float(cfg.teacher_weight[0]) if cfg.teacher_weight else 1.0, extra=extra)


def check_decoder(cache: store.Cache, replay_on: str, device: torch.device) -> None:
    """Say so when this run decodes JPEGs otherwise than the extraction did (nvJPEG on a GPU against
    libjpeg-turbo): the student's pixels then differ from the teacher's by a few levels."""
    stored = cache.manifest["fingerprint"]["views"].get("decoder", views.DECODER_CPU)
    here = views.DECODER_NVJPEG if replay_on == "device-decode" and device.type == "cuda" else views.DECODER_CPU
    if stored != here:
        console.print(f"[yellow]note:[/] the cache's views were decoded with {stored}, this run decodes with {here}: "
                      "the student's pixels differ from the teacher's by a few levels (pipelines/bench/"
                      "gpu_check.sh, stage decode, measures how many); --replay-on "
                      f"{'device-decode' if stored == views.DECODER_NVJPEG else 'workers or device'} decodes as it did")


def check_lined_up(cache: store.Cache, plan: list[data.ShardPlan], others: list[store.Cache]) -> None:
    """Caches of several teachers train one student only on the same views of the same images: checked here
    from their manifests and records (and again key by key and view by view as the stream reads them)."""
    drew = store.views_root(cache.manifest)
    for other in others:
        if store.views_root(other.manifest) != drew:
            raise ConfigError(f"--cache {other.url} does not share views with --cache {cache.url}: extract the second "
                              f"teacher with `mdcache extract ... --views-of {cache.url}`")
        theirs = {p.name: p.samples for p in data.plan_from_cache(other)}
        differ = [p.name for p in plan if theirs.get(p.name) != p.samples]
        if differ or len(theirs) != len(plan):
            raise data.DataError(f"--cache {other.url} and --cache {cache.url} hold other shards or sample counts "
                                 f"({', '.join(differ[:3]) or 'other shard names'})")


def load_online_teacher(cfg: PretrainConfig, cache: store.Cache | None, device: torch.device, j: int = 0):
    """The teacher for online mode (the j-th --teacher). With a cache, it must be the cache's teacher (same
    weights digest)."""
    from mdcache import teachers  # online mode only: the offline trainer never imports this

    weights = cfg.teacher_weights[j] if j < len(cfg.teacher_weights) else None
    if cache is None:
        return teachers.load_teacher(cfg.teacher[j], weights=weights, random_init=cfg.random_init, tap=cfg.tap,
                                     image_size=cfg.image_size, device=device, seed=cfg.teacher_seed,
                                     model_args=cfg.teacher_args)
    return teachers.load_cache_teacher(cache, spec=cfg.teacher[j], weights=weights, device=device,
                                       random_init=cfg.random_init)


def make_stream(setup: Setup, epoch: int, skip: int = 0) -> data.ShardStream:
    return data.ShardStream(setup.plan, setup.stream, epoch, skip, cache=setup.cache, recipe=setup.recipe,
                            extra=tuple(e.cache for e in setup.extra))


def targets_for(setup: Setup, batch: dict) -> list[torch.Tensor]:
    """Each teacher's targets for a batch already on the device, on the student's grid: decoded from the
    caches (dequantized late, on the device), or computed online."""
    if setup.teacher is None:
        parts: list[dict] = [{} for _ in range(1 + len(setup.extra))]
        for name, t in batch["targets"].items():  # "t{j}/array": the j-th extra cache's array
            j, _, array = name.rpartition("/")
            parts[int(j[1:]) if j else 0][array] = t
        out = [setup.cache.decode(parts[0]), *(e.cache.decode(p) for e, p in zip(setup.extra, parts[1:]))]
    else:
        from mdcache.teachers import run_teacher

        out = [run_teacher(t, batch["images"], setup.teacher_precision)
               for t in (setup.teacher, *(e.teacher for e in setup.extra))]
        out[0] = on_grid(out[0], setup.teacher.patch_grid, setup.stream.grid)  # (distill-loss of another head)
    return [out[0], *(on_grid(t, e.grid, setup.stream.grid) for t, e in zip(out[1:], setup.extra))]


def on_grid(targets: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, D] targets of a teacher's grid on another grid [B, H*W, D] (bilinear over the patch grid;
    the identity when the grids agree). A teacher's tokens cover the same view whatever its grid."""
    if tuple(grid) == tuple(to):
        return targets
    b, _, d = targets.shape
    x = targets.float().transpose(1, 2).reshape(b, d, *grid)
    x = torch.nn.functional.interpolate(x, size=tuple(to), mode="bilinear", align_corners=False)
    return x.reshape(b, d, -1).transpose(1, 2)


def student_loss(model: torch.nn.Module, setup: Setup, batch: dict, cfg: PretrainConfig, precision: str,
                 device: torch.device) -> torch.Tensor:
    """One micro-batch (already on the device): targets, forward, masked loss; with several teachers the
    weighted sum of each head's loss on the same masked tokens."""
    targets = targets_for(setup, batch)
    images = data.normalize(batch["images"], data.STUDENT_MEAN, data.STUDENT_STD)
    with autocast(device, precision):
        pred = model(images, batch["mask"])
    losses = [objective.masked_feature_loss(p, t, batch["mask"], target_norm=cfg.target_norm, loss=cfg.loss,
                                            beta=cfg.beta) for p, t in zip(pred if isinstance(pred, tuple) else (pred,),
                                                                           targets)]
    return sum(w * x for w, x in zip([setup.weight, *(e.weight for e in setup.extra)], losses))  # x1.0, +0: exact


# ----------------------------------------------------------------------------- optimization

def build_optimizer(cfg: PretrainConfig, student: Student, eff_batch: int) -> tuple[torch.optim.Optimizer, float]:
    from timm.optim import create_optimizer_v2

    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    return create_optimizer_v2(student, opt="adamw", lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                               fused=next(student.parameters()).is_cuda), lr


def build_scheduler(cfg: PretrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    from timm.scheduler import create_scheduler_v2

    sched, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                   min_lr=cfg.min_lr, warmup_lr=min(1e-6, cfg.min_lr), step_on_epochs=False,
                                   updates_per_epoch=updates_per_epoch)
    return sched


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """The state the loop shares with its helpers (MAE passes these as arguments; there are many)."""

    cfg: PretrainConfig
    setup: Setup
    dist: Dist
    device: torch.device
    precision: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    outdir: OutputDir
    steps: int                             # batches per epoch per rank (a multiple of accum_iter)
    scaler: Any = None                     # GradScaler, enabled for fp16 only
    on_step: Callable[[dict], None] | None = None
    step: int = 0                          # optimizer steps so far (all runs of this training)
    run_steps: int = 0                     # optimizer steps in this process (--stop-after)
    loss: float = float("nan")
    since: Any = None                      # device sum of the step losses since the last logged step
    since_steps: int = 0
    metrics: MetricsLog | None = None      # rank 0
    samples: MetricsLog | None = None      # --log-samples
    stop: StopFlag = field(default_factory=lambda: StopFlag(console))
    meter: Any = None                      # mdcache.progress.Meter: the bar or lines, images/s, loader wait

    @property
    def layout(self) -> dict:
        """What decides the data order and the schedule: exact resume needs all of it unchanged."""
        return {"world_size": self.dist.world, "lanes": max(1, self.cfg.workers), "batch_size": self.cfg.batch_size,
                "accum_iter": self.cfg.accum_iter, "seed": self.cfg.seed, "steps_per_epoch": self.steps,
                "views": self.setup.stream.views}  # a cache that grew since: the view of each epoch would change

    @property
    def meta(self) -> dict:
        s = self.setup
        return {"steps_per_epoch": self.steps, "image_size": s.stream.image_size, "grid": list(s.stream.grid),
                "teacher_dim": s.dim, "cache_id": s.cache.cache_id if s.cache else None,
                **({"teachers": s.teachers} if s.extra else {})}


def pretrain(cfg: PretrainConfig, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train; returns a summary (steps, final loss, paths). Safe to call under torchrun."""
    check_config(cfg)
    cfg = resolve(cfg)
    if cfg.deterministic:
        make_deterministic()
    device = use_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    dist = init_distributed(device, cfg.dist_timeout)
    configure_threads(device, cfg.workers, dist.world)
    setup = setup_data(cfg, device, dist)
    steps = data.steps_per_epoch(setup.plan, setup.stream, cfg.epochs)
    steps -= steps % cfg.accum_iter
    if steps == 0:
        raise data.DataError(f"an epoch has fewer batches than --accum-iter {cfg.accum_iter}")

    torch.manual_seed(cfg.seed)  # after the (online) teacher drew its init; same on every rank (DDP broadcasts too)
    student = build_student(cfg.student, image_size=setup.stream.image_size, grid=setup.stream.grid,
                            teacher_dim=setup.dim, drop_path=cfg.drop_path, layer_scale=cfg.layer_scale or None,
                            extra_dims=tuple(e.dim for e in setup.extra),
                            model_args=cfg.student_args)
    student = student.to(device)
    eff_batch = cfg.batch_size * cfg.accum_iter * dist.world
    optimizer, lr = build_optimizer(cfg, student, eff_batch)
    scheduler = build_scheduler(cfg, optimizer, steps // cfg.accum_iter)
    model: torch.nn.Module = student
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(cfg.seed + dist.rank)  # per-rank drop-path noise
    r = Run(cfg=cfg, setup=setup, dist=dist, device=device, precision=precision, model=model, optimizer=optimizer,
            scheduler=scheduler, outdir=OutputDir(cfg.out, cfg.storage_options), steps=steps, on_step=on_step,
            scaler=grad_scaler(device, precision))
    resume_path = checkpoint.resolve_resume(cfg.resume, r.outdir.local)
    start_epoch, start_batch = resume(r, resume_path)
    open_logs(r, resume_path, start_epoch, start_batch, lr, eff_batch)

    epoch, i, stopped = start_epoch, start_batch, False
    model.train()
    with r.stop, r.meter:
        for epoch in range(start_epoch, cfg.epochs):
            i, stopped = train_one_epoch(r, epoch, start_batch if epoch == start_epoch else 0)
            if stopped or epoch + 1 == cfg.epochs:
                break
            save_all(r, epoch + 1, 0)
        epoch, i = (epoch, i) if i < steps else (epoch + 1, 0)
        save_all(r, epoch, i)
    close_logs(r, stopped, epoch, i)
    return {"step": r.step, "epoch": epoch, "batch_in_epoch": i, "loss": r.loss, "stopped": stopped,
            "interrupted": r.stop.requested, "out": r.outdir.local, "rank": dist.rank, "world": dist.world}


def train_one_epoch(r: Run, epoch: int, skip: int) -> tuple[int, bool]:
    """Optimizer steps over one epoch, from batch `skip` on: (batches consumed, stopped early). No step waits
    for the device: the loss and the gradient norm stay there until a logging step reads them, and the ranks
    agree on stopping over the host's control group."""
    cfg, model, opt = r.cfg, r.model, r.optimizer
    if cfg.stop_after is not None and r.run_steps >= cfg.stop_after:  # --stop-after 0: save the initial state
        return skip, True
    loader = data.make_loader(make_stream(r.setup, epoch, skip), cfg.workers, pin_memory=r.device.type == "cuda",
                              worker_init_fn=ignore_sigint)
    batches, i = r.meter.data(loader), skip
    r.meter.restart()  # the last epoch's checkpoint is not this window's work
    while i < r.steps:
        loss_sum = torch.zeros((), device=r.device)
        for micro in range(cfg.accum_iter):
            batch = next(batches)
            with r.meter.waiting():  # the input side too: copies, and a replay or decode on the device
                batch = data.to_device(batch, r.device, r.setup.stream)
            if r.samples:
                r.samples.write({"epoch": epoch, "batch": i, "keys": batch["keys"], "views": batch["views"]})
            sync = r.dist.world == 1 or micro == cfg.accum_iter - 1  # DDP all-reduces on the last micro-step only
            with nullcontext() if sync else model.no_sync():
                loss = student_loss(model, r.setup, batch, cfg, r.precision, r.device)
                r.scaler.scale(loss / cfg.accum_iter).backward()
            loss_sum += loss.detach()
            r.meter.count(len(batch["keys"]) * r.dist.world)
            i += 1
        r.scaler.unscale_(opt)  # (no-op unless fp16) clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad) if cfg.clip_grad > 0 else None
        r.scaler.step(opt)
        r.scaler.update()
        opt.zero_grad(set_to_none=True)
        r.step += 1
        r.run_steps += 1
        r.scheduler.step_update(num_updates=r.step)
        step_loss = loss_sum / cfg.accum_iter  # stays on the device: summed, not read, between logging steps
        r.since, r.since_steps = (step_loss if r.since is None else r.since + step_loss), r.since_steps + 1
        stop_after = cfg.stop_after is not None and r.run_steps >= cfg.stop_after
        if (cfg.log_every and r.step % cfg.log_every == 0) or stop_after or (i >= r.steps and epoch + 1 == cfg.epochs):
            mean_steps = r.since_steps
            r.loss, loss_mean = means_over_ranks(torch.stack([step_loss, r.since / mean_steps]),
                                                 r.dist)  # the step's one read from the device
            r.since, r.since_steps = None, 0
            if not math.isfinite(r.loss):
                raise FloatingPointError(f"loss is {r.loss} at step {r.step} (epoch {epoch}); stopping")
            row = {"step": r.step, "epoch": round(epoch + i / r.steps, 4), "loss": r.loss, "loss_mean": loss_mean,
                   "mean_steps": mean_steps, "lr": opt.param_groups[0]["lr"]}
            rates = r.meter.report(r.step, **row)  # every rank: each resets its counts
            if r.dist.main:
                row.update(images_per_s=rates["items_per_s"], data_wait=rates["data_wait"])
                if grad_norm is not None:
                    row["grad_norm"] = round(float(grad_norm), 4)
                r.metrics.write(row)
                if r.on_step:
                    r.on_step(row)
        if any_rank(stop_after or r.stop.requested, r.dist):  # over the host's control group: no device sync
            return i, True  # every rank stops on the same step, or DDP deadlocks
        if cfg.save_every and r.step % cfg.save_every == 0 and i < r.steps:
            save_all(r, epoch, i)
    return i, False


def resume(r: Run, path: str | None) -> tuple[int, int]:
    """Restore model, optimizer, schedule and this rank's RNG from a checkpoint of the same layout;
    returns the (epoch, batch) to continue from."""
    position = (0, 0)
    if path:
        ckpt = checkpoint.load_trainer_state(path, "pretrain")
        layout = {k: v for k, v in r.layout.items() if k != "views" or "views" in ckpt}  # older checkpoints: no K
        if "views" in ckpt and ckpt["views"] != layout["views"]:
            raise checkpoint.CheckpointError(
                f"cannot resume exactly from {path}: it trained on {ckpt['views']} views per image, the cache now "
                f"gives {layout['views']} (it grew): resume with --cache-views {ckpt['views']}")
        checkpoint.check_resumable(ckpt, layout, path)
        unwrap(r.model).load_state_dict(ckpt["model"])
        r.optimizer.load_state_dict(ckpt["optimizer"])
        r.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            r.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"][r.dist.rank], r.device)
        position, r.step = (ckpt["epoch"], ckpt["batch_in_epoch"]), ckpt["step"]
    r.scheduler.step_update(num_updates=r.step)
    return position


def open_logs(r: Run, resumed: str | None, epoch: int, batch: int, lr: float, eff_batch: int) -> None:
    """Logs may run past the checkpoint (a crash after it): keep exactly what the checkpoint covers."""
    cfg, main = r.cfg, r.dist.main
    samples = MetricsLog(r.outdir.path(f"samples-rank{r.dist.rank}.jsonl"))
    if cfg.log_samples or os.path.exists(samples.path):
        samples.truncate(lambda row: bool(resumed) and (row["epoch"], row["batch"]) < (epoch, batch))
    r.samples = samples if cfg.log_samples else None
    r.meter = Meter("pretrain", "steps", cfg.epochs * (r.steps // cfg.accum_iter), r.step,
                    live=cfg.progress and main and sys.stderr.isatty(), quiet=not main, console=console,
                    fields={"epoch": "epoch {:.2f}", "loss_mean": "loss {:.4f}", "mean_steps": "(mean of {} steps)",
                            "lr": "lr {:.3g}"})
    if not main:
        return
    r.metrics = MetricsLog(r.outdir.path("metrics.jsonl"), tuple(cfg.log), os.path.basename(cfg.out.rstrip("/")),
                           public_config(cfg))
    r.metrics.truncate(lambda row: bool(resumed) and row["step"] <= r.step)
    online = r.setup.teacher is not None
    with open(r.outdir.path("config.json"), "w") as f:
        json.dump({"config": public_config(cfg), "lr": lr, "effective_batch": eff_batch, "world_size": r.dist.world,
                   "mode": "online" if online else "offline", **r.meta}, f, indent=1)
    source = f"online teacher {', '.join(cfg.teacher)}" if online else f"cache {', '.join(cfg.cache)}"
    console.print(f"pretrain {cfg.student} from {source}: "
                  f"{len(r.setup.plan)} shards, {r.steps} batches/epoch/rank, world {r.dist.world}, lr {lr:.3g} "
                  f"(effective batch {eff_batch}), {r.precision}, device {r.device}"
                  + (f"; resuming at epoch {epoch} batch {batch} (step {r.step})" if resumed else ""))


def save_all(r: Run, epoch: int, batch: int) -> None:
    """Every rank contributes its RNG state; rank 0 writes last.ckpt and student.safetensors, then uploads."""
    rngs = checkpoint.gather_rng_states(r.device, r.dist.world)
    if r.dist.main:
        write_checkpoint(r, epoch, batch, rngs)
    if r.dist.world > 1:  # the others wait here, on the host, for as long as --dist-timeout allows
        torch.distributed.barrier(group=control_group())


def write_checkpoint(r: Run, epoch: int, batch: int, rngs: list) -> None:
    cfg, student = r.cfg, unwrap(r.model)
    checkpoint.save_trainer_state(r.outdir.path(checkpoint.CKPT_NAME), "pretrain", {
        "model": student.state_dict(), "optimizer": r.optimizer.state_dict(), "scheduler": r.scheduler.state_dict(),
        "scaler": r.scaler.state_dict() if r.scaler.is_enabled() else None,
        "epoch": epoch, "batch_in_epoch": batch, "step": r.step, "rng": rngs, **r.layout, "config": public_config(cfg),
        **r.meta})
    meta = checkpoint.weights_meta("pretrain-student", cfg.student, r.setup.stream.image_size, data.STUDENT_MEAN,
                                   data.STUDENT_STD, cfg.student_args, cfg.layer_scale, step=r.step,
                                   cache_id=r.setup.cache.cache_id if r.setup.cache is not None else None)
    checkpoint.save_weights(r.outdir.path(checkpoint.WEIGHTS_NAME), student.backbone_state_dict(), meta)
    r.outdir.push()


def close_logs(r: Run, stopped: bool, epoch: int, batch: int) -> None:
    if r.samples:
        r.samples.close()
    if r.dist.main:
        r.metrics.close()
        plot_loss(r.metrics.rows(), r.outdir.path("loss.png"))
        r.outdir.push()
        loss = f"loss {r.loss:.4f}" if math.isfinite(r.loss) else "before any step"  # --stop-after 0: the initial state
        wrote = [f for f in ("last.ckpt", checkpoint.WEIGHTS_NAME, "metrics.jsonl", "loss.png")
                 if os.path.exists(r.outdir.path(f))]  # no loss.png before the first step
        console.print(f"{'stopped' if stopped else 'done'} at step {r.step} (epoch {epoch}, batch {batch}), "
                      f"{loss}; wrote {r.cfg.out}/{', '.join(wrote)}")
    if r.dist.world > 1:
        torch.distributed.barrier()


def run_cli(cfg: PretrainConfig) -> None:
    """CLI entry: exit 130 after a Ctrl-C save (errors are reported by the command boundary)."""
    summary = pretrain(cfg)
    if summary["interrupted"]:
        raise SystemExit(130)
