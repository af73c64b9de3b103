"""What every trainer command needs around its loop (MAE's util/misc.py): the process group, seeds,
cross-rank reductions, threads, and a clean stop on Ctrl-C.

Randomness is always a pure function of (seed, names...) through `mdcache.views.key_rng`, the same
sha256-based generator the view sampler uses, so an epoch, a rank or a sample replays exactly.
"""
from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as tdist
from rich.console import Console

from mdcache.views import key_rng


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_CONTROL: list = []  # the gloo group for host-side agreement, once joined


def init_distributed(device: torch.device, timeout_min: float = 60.0) -> Dist:
    """Under torchrun (WORLD_SIZE > 1): bind this rank's GPU, then join the group (NCCL when the device is a
    GPU, gloo on CPU), and a gloo group beside NCCL for host-side agreement (`control_group`). Collectives
    time out after `timeout_min` minutes (NCCL's default, 10, is shorter than rank 0 may spend saving and
    uploading a checkpoint while the others wait). Otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(minutes=timeout_min)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        _CONTROL[:] = [tdist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else None]
    if tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def current_dist() -> Dist:
    """The group already joined (loaders ask this), or one process."""
    if tdist.is_available() and tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (or the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def rng_for(seed: int, *parts: Any) -> np.random.Generator:
    """A numpy generator that depends only on (seed, parts): e.g. rng_for(seed, 'shuffle', epoch, rank)."""
    return key_rng(seed, "/".join(str(p) for p in parts))


def seed_for(seed: int, *parts: Any) -> int:
    """A 31-bit integer seed derived like rng_for (for torch.manual_seed and the stdlib)."""
    return int(rng_for(seed, *parts).integers(2**31 - 1))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A streaming (WebDataset-style) shuffle buffer: bounded memory; the order depends only on the
    rng and the item count, never on content."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def control_group():
    """The process group for host-side agreement (stop flags, counts, RNG states): gloo, so these collectives
    run on CPU tensors and never wait for the GPU (no host-device sync) nor need device buffers. Under NCCL
    it is a second group beside it; under gloo, the default group (None)."""
    return _CONTROL[0] if _CONTROL else None


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    """Sum a few host numbers over ranks (float64, over the control group)."""
    if dist.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    tdist.all_reduce(t, group=control_group())
    return t.tolist()


def means_over_ranks(t: torch.Tensor, dist: Dist) -> list[float]:
    """Device scalars (a 1-d tensor) averaged over ranks and read on the host in one go: one sync."""
    if dist.world > 1:
        t = t.detach().clone()
        tdist.all_reduce(t)
        t /= dist.world
    return t.tolist()


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank if it is true on any: all ranks must stop on the same step, or DDP deadlocks."""
    return all_reduce_sum([1.0 if flag else 0.0], dist)[0] > 0


def all_ranks(flag: bool, dist: Dist) -> bool:
    """True on every rank only if it is true on all (e.g. every rank still has a batch)."""
    return all_reduce_sum([1.0 if flag else 0.0], dist)[0] == dist.world


def make_deterministic() -> None:
    """Bitwise-reproducible GPU runs (exact resume, online == offline on a GPU): deterministic algorithms,
    cuBLAS's fixed workspace, and the math attention kernel (the fused ones' backward is not deterministic).
    Costs speed; CPU runs are deterministic without it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def configure_threads(device: torch.device, workers: int, world: int) -> None:
    """On CPU, leave a core per loader worker: OpenMP regions that lose a thread to a busy worker stall
    (measured here: 100x slower steps with 2 threads + 2 workers on 2 cores). OMP_NUM_THREADS wins."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, world) - workers))


class StopFlag:
    """Ctrl-C / SIGTERM -> finish the current optimizer step, save a checkpoint, exit. Twice: exit now."""

    def __init__(self, console: Console | None = None) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        self._console = console or Console(stderr=True, soft_wrap=True)

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._console.print(f"[yellow]{signal.Signals(signum).name}: saving a checkpoint after this step "
                            "(again to exit without saving)[/]")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def ignore_sigint(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which stops cleanly and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
