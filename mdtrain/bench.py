"""`mdtrain bench`: where the time and memory of a pretraining step go, cached vs online teacher.

One run, the same batches (epoch 0 onwards of the same seeded stream) for every phase:

    loader, images + targets     what the cached trainer's loader delivers
    loader, images only          the same stream without reading targets (the floor)
    student step only            one batch held in memory, train steps: the compute limit
    online step in memory        the same batch in memory + teacher forward + train step: what the
                                 teacher costs in compute (on a loader-bound GPU both steps below run at
                                 the loader's rate, which says nothing about compute)
    cached step                  loader + dequantize on the device + train step
    online-teacher step          loader (images only) + teacher forward + train step

Every timing starts after synchronized warm-up batches and ends synchronized; on a GPU each phase also
reports its peak GPU memory (torch.cuda.max_memory_allocated) and the GPU's name.

Three fresh processes: the limits (loader-only, student-only), the cached step, the online step;
the last two run the same code but for where targets come from, so their peak RSS compare
directly (the cached process never imports the teacher's library). Targets: loader with targets >= 0.8x
images-only; cached step >= 0.9x student-only; cached >= 1.25x online for a ViT-B-shaped student
with a CLIP-B/16-shaped teacher; cached peak RSS lower than online by at least the teacher's size.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import queue as queues
import resource
import sys
import time
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
from rich.console import Console

from mdcache.commands import model_args_opt, opt, precision_opt, storage_options_opt
from mdcache.devices import resolve_precision, use_device
from mdcache.errors import ConfigError

from . import data
from .pretrain import PretrainConfig, build_optimizer, make_stream, resolve, setup_data, student_loss
from .runtime import configure_threads
from .student import build_student

console = Console()


@dataclass
class BenchConfig:
    """Measure loader, student-only, cached-step and online-teacher-step images/s and peak memory in one run."""

    cache: Optional[str] = opt(None, "Cache directory made by `mdcache extract`.")
    student: str = opt("vit_base_patch16_224", "timm student model name.")
    student_args: dict = model_args_opt("--student-arg", "student")
    teacher: Optional[str] = opt(None, "Teacher for the online phase (must be the cache's teacher); without it the "
                                       "online phase is skipped.")
    teacher_weights: Optional[str] = opt(None, "Local teacher weights file for the online phase.")
    random_init: bool = opt(False, "Random-init online teacher (must match a --random-init cache).")
    source: Optional[str] = opt(None, "Override the cache's source location.")
    batch_size: int = opt(8, "Images per step.", ge=1)
    batches: int = opt(10, "Timed batches per phase.", ge=1)
    warmup: int = opt(2, "Untimed batches before each phase.", ge=0)
    loader_batches: int = opt(100, "Timed batches of the loader-only phases (cheap; more batches, less noise).", ge=1)
    repeats: int = opt(2, "Loader-only phases alternate this many times; the best rate of each is reported.", ge=1)
    workers: int = opt(2, "Loader workers.", ge=0)
    replay_on: str = opt("workers", "Where views are made, as in pretrain: workers, device (workers decode) or "
                                    "device-decode (workers read the files; the device decodes and replays, inside "
                                    "the timed step).")
    seed: int = opt(0, "Seed (stream order, masks, init).", ge=0)
    device: str = opt("auto", "Device: auto, cpu, cuda, cuda:N.")
    precision: str = precision_opt()
    json_out: bool = opt(False, "Print the measurements as JSON.", param="--json")
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).")

    def pretrain_config(self, online: bool) -> PretrainConfig:
        return resolve(PretrainConfig(
            cache=self.cache, source=self.source, student=self.student, student_args=dict(self.student_args),
            batch_size=self.batch_size, epochs=1000,
            workers=self.workers, replay_on=self.replay_on, seed=self.seed, device=self.device,
            precision=self.precision, warmup_epochs=0,
            lr=1e-4, drop_path=0.0, teacher=self.teacher if online else None, teacher_weights=self.teacher_weights,
            random_init=self.random_init, storage_options=dict(self.storage_options)))


def stream_batches(setup, workers: int, n: int, pin_memory: bool = False) -> Iterator[dict]:
    """n batches from epoch 0 on (wrapping into later epochs), as the trainer would load them."""
    epoch = 0
    while n > 0:
        got = 0
        for batch in data.make_loader(make_stream(setup, epoch), workers, pin_memory=pin_memory):
            yield batch
            n, got = n - 1, got + 1
            if n == 0:
                return
        if not got:  # would loop forever, forking the workers again for every empty epoch
            raise ConfigError(f"epoch {epoch} gave no batch of {setup.stream.batch_size} ({workers} loader "
                              "worker(s)): lower --batch-size or --workers")
        epoch += 1


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(batches: Iterator[dict], warmup: int, fn) -> float:
    """images/s over the batches after `warmup`, calling fn(batch) on each: the clock starts once the warm-up's
    work has finished on the device and stops once the timed work has (a GPU runs behind the host)."""
    t0 = None
    images = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            synchronize()
            t0 = time.perf_counter()
        fn(batch)
        if i >= warmup:
            images += len(batch["keys"])
    synchronize()
    if t0 is None or not images:
        raise ConfigError("no timed batches: raise --batches or lower --warmup")
    return images / (time.perf_counter() - t0)


def gpu_report(device: torch.device, phase: str) -> dict:
    """The GPU's name and this phase's peak memory (one process per phase: the peak is the phase's own)."""
    if device.type != "cuda":
        return {}
    return {"gpu": torch.cuda.get_device_name(device),
            f"{phase}_peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


PHASES = ("limits", "cached", "online")


def _phase(cfg: BenchConfig, phase: str, queue) -> None:
    """One fresh process per phase set, so the cached and online peak RSS are comparable and their own."""
    if "fork" in mp.get_all_start_methods():  # a spawned child inherits 'spawn'; loaders should fork as in training
        mp.set_start_method("fork", force=True)
    try:
        queue.put(_measure(cfg, phase))
    except BaseException as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _measure(cfg: BenchConfig, phase: str) -> dict:
    """limits: loader-only rates and the student-only step; cached / online: the full step + peak RSS."""
    pcfg = cfg.pretrain_config(online=phase == "online")
    device = use_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_threads(device, cfg.workers, 1)
    setup = setup_data(pcfg, device)
    data.steps_per_epoch(setup.plan, setup.stream, 1)  # a clear error when a worker would get no full batch
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, image_size=setup.stream.image_size, grid=setup.stream.grid,
                            teacher_dim=setup.dim, model_args=pcfg.student_args).to(device)
    optimizer, _ = build_optimizer(pcfg, student, cfg.batch_size)
    n = cfg.warmup + cfg.batches

    def step(batch: dict) -> None:
        loss = student_loss(student, setup, data.to_device(batch, device, setup.stream), pcfg, precision, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    pin = device.type == "cuda"
    if phase in ("cached", "online"):
        ips = timed(stream_batches(setup, cfg.workers, n, pin), cfg.warmup, step)
        out = {f"{phase}_step_ips": ips, f"{phase}_peak_rss_mb": peak_rss_mb(),
               f"{phase}_imported_teacher": "mdcache.teachers" in sys.modules,  # the cached process never does
               **gpu_report(device, phase)}
        if setup.teacher is not None:
            out["teacher_mb"] = sum(p.numel() * p.element_size() for p in setup.teacher.model.parameters()) / 2**20
            first = data.to_device(next(stream_batches(setup, 0, 1)), device, setup.stream)  # compute alone: in memory
            out["online_memory_ips"] = timed(iter([first] * n), cfg.warmup, step)
        return out
    out = {"tokens": setup.stream.grid[0] * setup.stream.grid[1], "teacher_dim": setup.dim,
           "image_size": setup.stream.image_size, "codec": setup.cache.codec}
    images_only = replace(setup, stream=replace(setup.stream, with_targets=False))
    nl = cfg.warmup + cfg.loader_batches
    out["loader_targets_ips"] = out["loader_images_ips"] = 0.0
    for _ in range(max(1, cfg.repeats)):  # alternate, keep the best: other jobs on the machine add noise
        out["loader_targets_ips"] = max(out["loader_targets_ips"],
                                        timed(stream_batches(setup, cfg.workers, nl, pin), cfg.warmup,
                                              lambda b: None))  # pinned as in training: its copy is loader work
        out["loader_images_ips"] = max(out["loader_images_ips"],
                                       timed(stream_batches(images_only, cfg.workers, nl, pin), cfg.warmup,
                                             lambda b: None))
    first = data.to_device(next(stream_batches(setup, 0, 1)), device, setup.stream)  # the same batch, held in memory
    out["student_only_ips"] = timed(iter([first] * n), cfg.warmup, step)
    return {**out, **gpu_report(device, phase)}


def _run_phase(cfg: BenchConfig, phase: str, target=_phase, poll_s: float = 1.0) -> dict:
    """Run one phase in a fresh process; a process that dies without a result (OOM-killed, segfault) is
    an error naming the phase, not a hang."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(cfg, phase, queue))
    p.start()
    try:
        while True:
            try:
                result = queue.get(timeout=poll_s)
                break
            except queues.Empty:
                if not p.is_alive():
                    try:  # it may have put its result just before exiting
                        result = queue.get(timeout=poll_s)
                        break
                    except queues.Empty:
                        raise RuntimeError(f"bench {phase} phase: its process exited with code {p.exitcode} "
                                           "without a result (killed? out of memory?)") from None
        p.join()
    finally:  # interrupted (Ctrl-C, a caller's deadline): the phase's process does not outlive the bench
        if p.is_alive():
            p.kill()
            p.join()
    if "error" in result:
        raise RuntimeError(f"bench {phase} phase failed: {result['error']}")
    return result


def bench(cfg: BenchConfig) -> dict:
    if not cfg.cache:
        raise ConfigError("bench needs --cache (and --teacher for the online phase)")
    r = {"student": cfg.student, "batch_size": cfg.batch_size, "batches": cfg.batches, "workers": cfg.workers}
    for phase in PHASES if cfg.teacher else PHASES[:2]:
        r.update(_run_phase(cfg, phase))
    r["ratio_loader_targets_vs_images"] = r["loader_targets_ips"] / r["loader_images_ips"]
    r["ratio_cached_vs_student_only"] = r["cached_step_ips"] / r["student_only_ips"]
    if cfg.teacher:
        r["ratio_cached_vs_online"] = r["cached_step_ips"] / r["online_step_ips"]
        r["ratio_cached_vs_online_compute"] = r["student_only_ips"] / r["online_memory_ips"]
        r["rss_saving_mb"] = r["online_peak_rss_mb"] - r["cached_peak_rss_mb"]
    return r


def run_cli(cfg: BenchConfig) -> None:
    r = bench(cfg)
    if cfg.json_out:
        print(json.dumps(r, indent=1))
        return

    def verdict(ok: bool) -> str:
        return "[green]meets[/]" if ok else "[red]BELOW[/]"

    console.print(f"student {r['student']}, {r['image_size']}px, {r['tokens']} tokens x {r['teacher_dim']} dims "
                  f"({r['codec']} cache), batch {r['batch_size']}, {r['batches']} timed batches, "
                  f"{r['workers']} workers")
    console.print(f"loader, images + targets : {r['loader_targets_ips']:9.1f} images/s "
                  f"({r['loader_targets_ips'] / max(1, r['workers']):.1f} per worker)")
    console.print(f"loader, images only      : {r['loader_images_ips']:9.1f} images/s")
    console.print(f"student step only (synth): {r['student_only_ips']:9.1f} images/s")
    if "online_memory_ips" in r:
        console.print(f"online step in memory    : {r['online_memory_ips']:9.1f} images/s")
    console.print(f"cached step              : {r['cached_step_ips']:9.1f} images/s")
    if "online_step_ips" in r:
        console.print(f"online-teacher step      : {r['online_step_ips']:9.1f} images/s")
    x = r["ratio_loader_targets_vs_images"]
    console.print(f"loader targets / images-only : {x:.3f} ({verdict(x >= 0.8)} target >= 0.8)")
    x = r["ratio_cached_vs_student_only"]
    console.print(f"cached step / student-only   : {x:.3f} ({verdict(x >= 0.9)} target >= 0.9)")
    if "online_step_ips" in r:
        x = r["ratio_cached_vs_online"]
        console.print(f"cached / online step         : {x:.3f} "
                      f"({verdict(x >= 1.25)} target >= 1.25 for ViT-B + CLIP-B/16)")
        console.print(f"cached / online, compute only: {r['ratio_cached_vs_online_compute']:.3f} (batches in memory: "
                      "what the teacher costs, whatever the loader's rate)")
        console.print(f"peak RSS cached {r['cached_peak_rss_mb']:.0f} MB, online {r['online_peak_rss_mb']:.0f} MB: "
                      f"saves {r['rss_saving_mb']:.0f} MB vs teacher {r['teacher_mb']:.0f} MB "
                      f"({verdict(r['rss_saving_mb'] >= r['teacher_mb'])} target: saving >= teacher size)")
    else:
        console.print(f"peak RSS cached {r['cached_peak_rss_mb']:.0f} MB (no --teacher: online phase skipped)")
    if "gpu" in r:
        console.print(f"{r['gpu']}: peak GPU memory " + ", ".join(
            f"{p} {r[f'{p}_peak_gpu_mb']:.0f} MB" for p in PHASES if f"{p}_peak_gpu_mb" in r))
