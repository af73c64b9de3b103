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
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from rich.console import Console

from mdcache import store, views
from mdcache.config import opt, parse_floats
from mdcache.devices import resolve_device, resolve_precision

from . import checkpoint, data, objective
from .outputs import OutputDir
from .masking import DEFAULT_MASK_RATIO, DEFAULT_MIN_PATCHES, scaled_min_patches
from .student import Student, build_student

console = Console(stderr=True)


@dataclass
class PretrainConfig:
    """MaskDistill pretraining of a timm ViT from cached teacher targets (or an online teacher)."""

    cache: str = opt("", "Cache directory (<root>/<cache-id>) made by `mdcache extract`, local path or fsspec URL.")
    source: str = opt("", "Source shards: overrides where the cache's images are; required online without --cache.")
    student: str = opt("vit_base_patch16_224", "timm model name of the student (vit_*, deit_*, beitv2_*, ...).")
    out: str = opt("runs/pretrain", "Output directory or fsspec URL (remote: mirrored locally, uploaded after every checkpoint): metrics.jsonl, last.ckpt, student.safetensors, loss.png.")
    epochs: int = opt(300, "Epochs (passes over the cache; each uses one stored view per image).")
    batch_size: int = opt(256, "Images per process per micro-step (effective batch = this x accum-iter x processes).")
    accum_iter: int = opt(1, "Micro-steps accumulated per optimizer step.")
    blr: float = opt(1.875e-4, "Base learning rate: lr = blr x effective batch / 256 (MaskDistill: 1.5e-3 at batch 2048).")
    lr: Optional[float] = opt(None, "Absolute peak learning rate (overrides --blr).")
    min_lr: float = opt(1e-5, "Learning rate at the end of the cosine schedule.")
    warmup_epochs: int = opt(10, "Linear warmup epochs.")
    weight_decay: float = opt(0.05, "AdamW weight decay (none on norms, biases, position/cls/mask tokens).")
    betas: str = opt("0.9,0.999", "AdamW betas 'b1,b2' (BEiT v2 long runs: 0.9,0.98).")
    clip_grad: float = opt(3.0, "Gradient norm clipping (0 disables).")
    drop_path: float = opt(0.1, "Stochastic depth rate of the student.")
    layer_scale: float = opt(0.0, "Layer-scale init value passed to timm as init_values (0: the model's default).")
    mask_ratio: float = opt(DEFAULT_MASK_RATIO, "Fraction of patches masked (exactly round(ratio x patches)); 75/196 by default.")
    min_mask_patches: int = opt(DEFAULT_MIN_PATCHES, "Smallest mask block on a 196-patch grid (scaled to the cache's grid).")
    target_norm: str = opt("layernorm", "Target normalization: layernorm (per token, no affine) or none.")
    loss: str = opt("smooth_l1", "Loss on masked tokens: smooth_l1, mse or cosine.")
    beta: float = opt(2.0, "Smooth-L1 beta (OPEN in MaskDistill: 1.0 or 2.0).")
    seed: int = opt(0, "Seed: shard order, shuffle, view choice, masks, init (online without a cache: also views).")
    workers: int = opt(2, "Loader worker processes per rank (exact resume needs the same number).")
    shuffle_buffer: int = opt(256, "Shuffle buffer size inside each shard (samples).")
    device: str = opt("auto", "Device: auto (CUDA at LOCAL_RANK if available, else CPU), cpu, cuda, cuda:N.")
    precision: str = opt("auto", "Autocast: auto (bf16 on CUDA with bf16 support, else fp32), fp32, bf16.")
    resume: Optional[str] = opt(None, "Resume from a last.ckpt (or 'auto': OUT/last.ckpt if it exists).")
    save_every: int = opt(0, "Also checkpoint every N optimizer steps (0: at the end of each epoch only).")
    log_every: int = opt(1, "Log every N optimizer steps.")
    stop_after: int = opt(0, "Stop after N optimizer steps in this process, with a checkpoint (0: run to the end).")
    log_samples: bool = opt(False, "Write OUT/samples-rank<R>.jsonl: the keys of every batch (audit data order).")
    progress: bool = opt(True, "Rich progress bar on rank 0 (when stderr is a terminal).")
    teacher: str = opt("", "Online mode: run this teacher in the loop (clip-b16, open_clip:ARCH[:TAG], timm:NAME).")
    teacher_weights: Optional[str] = opt(None, "Online mode: local teacher weights file.")
    random_init: bool = opt(False, "Online mode: randomly initialised teacher (tests/benchmarks only).")
    tap: str = opt("final", "Online mode without a cache: teacher feature tap (final, ln_post, proj).")
    views: int = opt(2, "Online mode without a cache: views per image (as `mdcache extract --views`).")
    image_size: int = opt(224, "Online mode without a cache: image size (as `mdcache extract --image-size`).")
    crop_scale: str = opt("0.2,1.0", "Online mode without a cache: RandomResizedCrop scale 'min,max'.")
    crop_ratio: str = opt("0.75,1.3333333333", "Online mode without a cache: RandomResizedCrop ratio 'min,max'.")
    flip: bool = opt(True, "Online mode without a cache: random horizontal flip.")
    color_jitter: float = opt(0.0, "Online mode without a cache: ColorJitter strength (as `mdcache extract --color-jitter`).")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE for cache and source (repeatable).")
    local_cache: str = opt("", "Local directory for a read-through copy of a remote cache: each shard is downloaded once per machine.")
    local_cache_gb: float = opt(100.0, "Size bound of --local-cache in GB (least recently used shards are evicted).")


# ----------------------------------------------------------------------------- setup pieces

def configure_threads(device: torch.device, workers: int, world: int) -> None:
    """On CPU, leave a core per loader worker: OpenMP regions that lose a thread to a busy worker stall
    (measured here: 100x slower steps with 2 threads + 2 workers on 2 cores). OMP_NUM_THREADS wins."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, world) - workers))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world). Under torchrun: init the process group (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


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


def setup_data(cfg: PretrainConfig, rank: int, world: int, device: torch.device, precision: str,
               with_targets: bool = True) -> Setup:
    """Open the cache and plan the stream; in online mode also load the teacher (lazily imported)."""
    so = store.parse_storage_options(cfg.storage_option) or None
    cache = recipe = teacher = None
    if cfg.cache:
        cache = store.open_cache(cfg.cache, so, local_cache=cfg.local_cache or None,
                                 local_cache_bytes=int(cfg.local_cache_gb * 2**30))
        plan = data.plan_from_cache(cache, cfg.source or None)
        t = cache.manifest["teacher"]
        grid, dim, image_size, k = tuple(t["patch_grid"]), int(t["dim"]), int(cache.manifest["image_size"]), int(cache.manifest["views"])
    elif cfg.teacher and cfg.source:
        plan = data.plan_from_source(cfg.source, so)
    else:
        raise ValueError("give --cache (offline), or --teacher with --source (online without a cache)")
    if cfg.teacher:
        teacher = load_online_teacher(cfg, cache, device)
        if cache is None:
            grid, dim, image_size, k = tuple(teacher.patch_grid), teacher.dim, teacher.image_size, cfg.views
            recipe = views.ViewRecipe(image_size=image_size, scale=parse_floats(cfg.crop_scale, 2, "--crop-scale"),
                                      ratio=parse_floats(cfg.crop_ratio, 2, "--crop-ratio"), flip=cfg.flip,
                                      views=cfg.views, seed=cfg.seed, color_jitter=cfg.color_jitter)
    lanes = max(1, cfg.workers)
    scfg = data.StreamConfig(batch_size=cfg.batch_size, image_size=image_size, grid=grid, views=k, seed=cfg.seed,
                             mask_ratio=cfg.mask_ratio, min_mask_patches=scaled_min_patches(grid[0] * grid[1], cfg.min_mask_patches),
                             shuffle_buffer=cfg.shuffle_buffer, rank=rank, world=world, lanes=lanes,
                             with_targets=with_targets and teacher is None, storage_options=so)
    tprec = resolve_precision(cfg.precision, device)
    return Setup(plan=plan, stream=scfg, cache=cache, recipe=recipe, dim=dim, teacher=teacher, teacher_precision=tprec)


def load_online_teacher(cfg: PretrainConfig, cache: store.Cache | None, device: torch.device):
    """The teacher for online mode. With a cache, it must be the cache's teacher (same weights digest)."""
    from mdcache import teachers  # online mode only: the offline trainer never imports this

    if cache is None:
        return teachers.load_teacher(cfg.teacher, weights=cfg.teacher_weights, random_init=cfg.random_init, tap=cfg.tap,
                                     image_size=cfg.image_size, device=device, seed=cfg.seed)
    fp = cache.manifest["fingerprint"]["teacher"]
    t = teachers.load_teacher(cfg.teacher, weights=cfg.teacher_weights, random_init=cfg.random_init, tap=fp["tap"],
                              image_size=int(cache.manifest["image_size"]), device=device,
                              seed=int(fp.get("init_seed", cfg.seed)))
    if t.identity["weights_sha256"] != fp["weights_sha256"]:
        raise ValueError(f"online teacher {cfg.teacher!r} (weights {t.identity['weights_sha256'][:12]}) is not the teacher "
                         f"of cache {cache.url} (weights {fp['weights_sha256'][:12]}): the comparison would be meaningless")
    return t


def make_stream(setup: Setup, epoch: int, skip: int = 0) -> data.ShardStream:
    return data.ShardStream(setup.plan, setup.stream, epoch, skip, cache=setup.cache, recipe=setup.recipe)


def targets_for(setup: Setup, batch: dict) -> torch.Tensor:
    """Teacher targets for a batch already on the device: decoded from the cache, or computed online."""
    if setup.teacher is None:
        return setup.cache.decode(batch["targets"])  # dequantize late, on the device
    from mdcache.teachers import run_teacher

    t = setup.teacher
    return run_teacher(t, data.normalize(batch["images"], t.mean, t.std), setup.teacher_precision)


def build_optimizer(cfg: PretrainConfig, student: Student, eff_batch: int) -> tuple[torch.optim.Optimizer, float]:
    from timm.optim import create_optimizer_v2

    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    betas = parse_floats(cfg.betas, 2, "--betas")
    return create_optimizer_v2(student, opt="adamw", lr=lr, weight_decay=cfg.weight_decay, betas=betas), lr


def build_scheduler(cfg: PretrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    from timm.scheduler import create_scheduler_v2

    sched, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                   min_lr=cfg.min_lr, warmup_lr=min(1e-6, cfg.min_lr), step_on_epochs=False,
                                   updates_per_epoch=updates_per_epoch)
    return sched


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def student_loss(model: torch.nn.Module, setup: Setup, batch: dict, cfg: PretrainConfig, precision: str,
                 device: torch.device) -> torch.Tensor:
    """One micro-batch (already on the device): targets, forward, masked loss."""
    targets = targets_for(setup, batch)
    images = data.normalize(batch["images"], data.STUDENT_MEAN, data.STUDENT_STD)
    with autocast(device, precision):
        pred = model(images, batch["mask"])
    return objective.distill_loss(pred, targets, batch["mask"], target_norm=cfg.target_norm, loss=cfg.loss, beta=cfg.beta)


# ----------------------------------------------------------------------------- outputs

class StopFlag:
    """Ctrl-C / SIGTERM -> finish the current optimizer step, save a checkpoint, exit. Twice: exit now."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.print(f"[yellow]{signal.Signals(signum).name}: saving a checkpoint after this step "
                      "(again to exit without saving)[/]")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def ignore_sigint(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which stops cleanly and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def plot_loss(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (masked tokens)")
    ax.set_title("mdtrain pretrain")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def keep_jsonl(path: str, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSON-lines log keeping only the rows `keep` accepts (missing file: nothing to do)."""
    if not os.path.exists(path):
        return
    rows = [line for line in open(path) if line.strip() and keep(json.loads(line))]
    with open(path, "w") as f:
        f.writelines(rows)


def unwrap(model: torch.nn.Module) -> Student:
    return model.module if hasattr(model, "module") else model


def save_all(cfg: PretrainConfig, out: str, model, optimizer, scheduler, epoch: int, batch_in_epoch: int,
             step: int, device: torch.device, world: int, rank: int, meta: dict) -> None:
    """Every rank contributes its RNG state; rank 0 writes last.ckpt and student.safetensors."""
    rngs = checkpoint.gather_rng_states(device, world)
    if rank != 0:
        return
    student = unwrap(model)
    state = {"version": checkpoint.CKPT_VERSION, "model": student.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
             "rng": rngs, "world_size": world, "lanes": max(1, cfg.workers), "batch_size": cfg.batch_size,
             "accum_iter": cfg.accum_iter, "seed": cfg.seed, "config": asdict(cfg), **meta}
    checkpoint.atomic_torch_save(state, os.path.join(out, checkpoint.CKPT_NAME))
    checkpoint.save_student(os.path.join(out, checkpoint.WEIGHTS_NAME), student.backbone_state_dict(),
                            {"timm_model": cfg.student, "img_size": str(meta["image_size"]), "step": str(step),
                             "cache_id": str(meta.get("cache_id"))})


def check_resume(ckpt: dict, cfg: PretrainConfig, world: int, steps: int) -> None:
    """Exact resume needs the same data layout; say which knob differs instead of silently reshuffling."""
    expected = {"world_size": world, "lanes": max(1, cfg.workers), "batch_size": cfg.batch_size,
                "accum_iter": cfg.accum_iter, "seed": cfg.seed, "steps_per_epoch": steps}
    diff = [f"{k}: checkpoint {ckpt.get(k)} vs now {v}" for k, v in expected.items() if ckpt.get(k) != v]
    if diff:
        raise checkpoint.CheckpointError("cannot resume exactly, the data layout changed (" + "; ".join(diff) + ")")


# ----------------------------------------------------------------------------- the loop

def pretrain(cfg: PretrainConfig, on_step: Callable[[dict], None] | None = None) -> dict:
    """Train; returns a summary (steps, final loss, paths). Safe to call under torchrun."""
    objective.check(cfg.target_norm, cfg.loss)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    rank, world = init_distributed(device)
    configure_threads(device, cfg.workers, world)
    setup = setup_data(cfg, rank, world, device, precision)
    steps = data.steps_per_epoch(setup.plan, setup.stream, cfg.epochs)
    steps -= steps % cfg.accum_iter
    if steps == 0:
        raise data.DataError(f"an epoch has fewer batches than --accum-iter {cfg.accum_iter}")
    updates_per_epoch = steps // cfg.accum_iter
    image_size = setup.stream.image_size
    torch.manual_seed(cfg.seed)  # after the (online) teacher drew its init; same on every rank (DDP broadcasts too)
    student = build_student(cfg.student, image_size=image_size, grid=setup.stream.grid, teacher_dim=setup.dim,
                            drop_path=cfg.drop_path, layer_scale=cfg.layer_scale or None).to(device)
    eff_batch = cfg.batch_size * cfg.accum_iter * world
    optimizer, lr = build_optimizer(cfg, student, eff_batch)
    scheduler = build_scheduler(cfg, optimizer, updates_per_epoch)
    model: torch.nn.Module = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(cfg.seed + rank)  # per-rank drop-path noise

    outdir = OutputDir(cfg.out, store.parse_storage_options(cfg.storage_option))  # local, or mirrored to a URL
    out = outdir.local
    meta = {"steps_per_epoch": steps, "image_size": image_size, "grid": list(setup.stream.grid), "teacher_dim": setup.dim,
            "cache_id": setup.cache.manifest["cache_id"] if setup.cache else None}
    start_epoch, start_batch, step = 0, 0, 0
    resume = cfg.resume
    if resume == "auto":
        resume = os.path.join(out, checkpoint.CKPT_NAME) if os.path.exists(os.path.join(out, checkpoint.CKPT_NAME)) else None
    if resume:
        ckpt = checkpoint.load_checkpoint(resume)
        check_resume(ckpt, cfg, world, steps)
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        checkpoint.set_rng_state(ckpt["rng"][rank], device)
        start_epoch, start_batch, step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        del ckpt
    scheduler.step_update(num_updates=step)

    metrics_path = os.path.join(out, "metrics.jsonl")
    samples_path = os.path.join(out, f"samples-rank{rank}.jsonl")
    # Logs may run past the checkpoint (a crash after it): keep exactly what the checkpoint covers.
    keep_jsonl(samples_path, lambda r: resume and (r["epoch"], r["batch"]) < (start_epoch, start_batch))
    if rank == 0:
        keep_jsonl(metrics_path, lambda r: resume and r["step"] <= step)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"config": asdict(cfg), "lr": lr, "effective_batch": eff_batch, "world_size": world,
                       "mode": "online" if setup.teacher is not None else "offline", **meta}, f, indent=1)
        mode = f"online teacher {cfg.teacher}" if setup.teacher is not None else f"cache {cfg.cache}"
        console.print(f"pretrain {cfg.student} from {mode}: {len(setup.plan)} shards, {steps} batches/epoch/rank, "
                      f"world {world}, lr {lr:.3g} (effective batch {eff_batch}), {precision}, device {device}"
                      + (f"; resuming at epoch {start_epoch} batch {start_batch} (step {step})" if resume else ""))
    samples_log = open(samples_path, "a") if cfg.log_samples else None
    metrics = open(metrics_path, "a") if rank == 0 else None
    progress = _progress(cfg, rank, cfg.epochs * updates_per_epoch, step)

    run_steps, last_loss, stopped = 0, float("nan"), False
    epoch, i = start_epoch, start_batch
    model.train()
    with StopFlag() as stop, progress:
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_batch if epoch == start_epoch else 0
            loader = data.make_loader(make_stream(setup, epoch, skip), cfg.workers, pin_memory=device.type == "cuda",
                                      worker_init_fn=ignore_sigint)
            batches = iter(loader)
            i, t0, seen, acc_loss = skip, time.perf_counter(), 0, 0.0
            while i < steps:
                batch = data.to_device(next(batches), device)
                if samples_log:
                    samples_log.write(json.dumps({"epoch": epoch, "batch": i, "keys": batch["keys"],
                                                  "views": batch["views"]}) + "\n")
                last_micro = (i + 1) % cfg.accum_iter == 0
                with (model.no_sync() if world > 1 and not last_micro else nullcontext()):
                    loss = student_loss(model, setup, batch, cfg, precision, device)
                    (loss / cfg.accum_iter).backward()
                acc_loss += float(loss.detach()) / cfg.accum_iter
                seen += len(batch["keys"])
                i += 1
                if not last_micro:
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad) if cfg.clip_grad > 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                run_steps += 1
                scheduler.step_update(num_updates=step)
                last_loss = _mean_across(acc_loss, world)
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"loss is {last_loss} at step {step} (epoch {epoch}); stopping")
                if rank == 0 and step % cfg.log_every == 0:
                    dt = time.perf_counter() - t0
                    row = {"step": step, "epoch": round(epoch + i / steps, 4), "loss": last_loss,
                           "lr": optimizer.param_groups[0]["lr"], "images_per_s": round(seen * world / max(dt, 1e-9), 2)}
                    if grad_norm is not None:
                        row["grad_norm"] = round(float(grad_norm), 4)
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    progress.update(row)
                    if on_step:
                        on_step(row)
                    t0, seen = time.perf_counter(), 0
                acc_loss = 0.0
                stopped = _any_rank((cfg.stop_after and run_steps >= cfg.stop_after) or stop.requested, world)
                if stopped:
                    break
                if cfg.save_every and step % cfg.save_every == 0 and i < steps:
                    save_all(cfg, out, model, optimizer, scheduler, epoch, i, step, device, world, rank, meta)
                    if rank == 0:
                        metrics.flush()
                        outdir.push()
            del batches, loader
            if stopped:
                break
            start_batch = 0
        next_epoch, next_batch = (epoch, i) if i < steps else (epoch + 1, 0)
        save_all(cfg, out, model, optimizer, scheduler, next_epoch, next_batch, step, device, world, rank, meta)
    if samples_log:
        samples_log.close()
    if rank == 0:
        metrics.close()
        plot_loss(metrics_path, os.path.join(out, "loss.png"))
        outdir.push()
        console.print(f"{'stopped' if stopped else 'done'} at step {step} (epoch {next_epoch}, batch {next_batch}), "
                      f"loss {last_loss:.4f}; wrote {cfg.out}/last.ckpt, student.safetensors, metrics.jsonl, loss.png")
    if dist.is_initialized():
        dist.barrier()
    return {"step": step, "epoch": next_epoch, "batch_in_epoch": next_batch, "loss": last_loss, "stopped": stopped,
            "interrupted": stop.requested, "out": out, "rank": rank, "world": world}


def _mean_across(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def _any_rank(flag: bool, world: int) -> bool:
    """All ranks must stop on the same step, or DDP deadlocks."""
    if world == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _progress:
    """Rich progress on rank 0 when stderr is a terminal; otherwise a line every few log rows."""

    def __init__(self, cfg: PretrainConfig, rank: int, total: int, done: int):
        self.live = cfg.progress and rank == 0 and sys.stderr.isatty()
        self.quiet = rank != 0
        self.total, self.done = total, done
        self.bar = None

    def __enter__(self) -> "_progress":
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]pretrain[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self.bar.__enter__()
            self.task = self.bar.add_task("pretrain", total=self.total, completed=self.done, loss=float("nan"), ips=0.0)
        return self

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], loss=row["loss"], ips=row["images_per_s"])
        elif not self.quiet and (row["step"] % 50 == 0 or row["step"] == self.total):
            console.print(f"step {row['step']}/{self.total} epoch {row['epoch']:.2f} loss {row['loss']:.4f} "
                          f"lr {row['lr']:.3g} {row['images_per_s']:.1f} img/s")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def run_cli(cfg: PretrainConfig) -> None:
    """CLI entry: clear one-line errors for the failures users can fix; exit 130 after a Ctrl-C save."""
    from mdcache.sources import SourceError

    from .checkpoint import CheckpointError
    from .student import StudentError

    user_errors: tuple = (store.CacheError, data.DataError, SourceError, StudentError, CheckpointError, ValueError)
    if cfg.teacher:  # online mode only: offline runs never import the teacher module
        from mdcache.teachers import TeacherError
        user_errors += (TeacherError,)
    try:
        summary = pretrain(cfg)
    except user_errors as e:
        Console(stderr=True).print(f"[red]error:[/] {e}")
        raise SystemExit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary["interrupted"]:
        raise SystemExit(130)
