"""`mdtrain bench-storage`: the trainer's loader (images + targets) reading a cache's targets from a
bucket vs from local disk, in whole passes (epoch 0 of the cache: the same batches every time):

    local       a local copy of the cache (the reference)
    remote      targets straight from the bucket, every pass
    cold        through --local-cache, first pass (downloads each shard once)
    warm        through --local-cache, next pass (reads the local copies: no bucket request at all)

Images come from a local copy of the source in every phase (`--source` override), so the phases
differ only in where the targets are read from. Each phase runs `--repeats` times (a fresh
read-through directory for every cold pass); the best pass is reported. Target: warm >= 0.8x local.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch
from rich.console import Console

from mdcache import fs as mfs
from mdcache import store
from mdcache.commands import opt, storage_options_opt
from mdcache.errors import ConfigError

from . import data
from .pretrain import PretrainConfig, Setup, make_stream, setup_data
from .runtime import configure_threads

console = Console()
PHASES = ("local", "remote", "cold", "warm")


@dataclass
class StorageBenchConfig:
    """Loader throughput from a remote cache (direct, through a cold and a warm --local-cache) vs local disk."""

    cache: Optional[str] = opt(None, "Remote cache directory (e.g. s3://bucket/mdcache/<id>).")
    student: str = opt("vit_tiny_patch16_224", "Student name (only its input size matters here).")
    batch_size: int = opt(16, "Images per batch.", ge=1)
    repeats: int = opt(3, "Passes per phase (each a whole epoch of the cache); the best is reported.", ge=1)
    workers: int = opt(2, "Loader workers.", ge=0)
    seed: int = opt(0, "Seed (same batches in every phase).", ge=0)
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).")


def copy_cache(cache: store.Cache, dst_root: str) -> str:
    """Download manifest, commit records and committed shards: a local cache with the same id."""
    fs, path = mfs.url_to_fs(cache.url, cache.storage_options)
    files = [mfs.join(path, f) for f in store.committed_files(cache)]  # calibration arrays too (pca)
    return mfs.download_tree(fs, path, os.path.join(dst_root, cache.cache_id), files=files)


def copy_source(cache: store.Cache, dst: str) -> str:
    """Download the cache's source shards; returns a `--source` spec for the copy (same shard names)."""
    shards = cache.sources()
    fs, root = mfs.url_to_fs(shards[0].url, cache.storage_options)
    if shards[0].files:  # an image folder: one root, files relative to it
        return mfs.download_tree(fs, root, dst, files=[mfs.join(root, f) for s in shards for f in s.files])
    paths = []
    for s in shards:
        fs, path = mfs.url_to_fs(s.url, cache.storage_options)
        paths.append(mfs.download_tree(fs, path, os.path.join(dst, os.path.basename(path))))
    if any(c in p for p in paths for c in ",{}*?["):
        raise ConfigError(f"cannot name the local source copy in {dst!r} as a source spec (has ',{{}}*?[')")
    return ",".join(paths)


def open_setup(cfg: StorageBenchConfig, cache: str, source: str, local_cache: str | None = None) -> Setup:
    """The trainer's data setup over `cache` (its targets) and `source` (its images). The cache is
    opened here, once, as the trainer opens it: passes over the setup read shards only."""
    pcfg = PretrainConfig(cache=cache, source=source, student=cfg.student, batch_size=cfg.batch_size,
                          workers=cfg.workers, seed=cfg.seed, device="cpu", local_cache=local_cache,
                          storage_options=dict(cfg.storage_options))
    return setup_data(pcfg, torch.device("cpu"))


def timed_pass(setup: Setup, workers: int) -> float:
    """images/s over one whole epoch (epoch 0), loader start-up and shard downloads included."""
    t0 = t1 = time.perf_counter()
    images = 0
    for batch in data.make_loader(make_stream(setup, 0), workers):
        images += len(batch["keys"])
        t1 = time.perf_counter()  # at the last batch: worker shutdown is not part of the pass
    if not images:
        raise ConfigError("an epoch of this cache has no full batch: lower --batch-size")
    return images / (t1 - t0)


def bench_storage(cfg: StorageBenchConfig) -> dict:
    if not cfg.cache:
        raise ConfigError("bench-storage needs --cache (a cache in a bucket)")
    configure_threads(torch.device("cpu"), cfg.workers, 1)
    cache = store.open_cache(cfg.cache, cfg.storage_options)
    passes: dict[str, list[float]] = {p: [] for p in PHASES}
    with tempfile.TemporaryDirectory(prefix="mdtrain-bench-storage-") as tmp:
        source = copy_source(cache, os.path.join(tmp, "source"))
        local = open_setup(cfg, copy_cache(cache, os.path.join(tmp, "cache")), source)
        remote = open_setup(cfg, cfg.cache, source)
        for rep in range(max(1, cfg.repeats)):  # interleaved: other jobs on the machine spread over all phases
            passes["local"].append(timed_pass(local, cfg.workers))
            passes["remote"].append(timed_pass(remote, cfg.workers))
            through = open_setup(cfg, cfg.cache, source, local_cache=os.path.join(tmp, f"read-through-{rep}"))
            passes["cold"].append(timed_pass(through, cfg.workers))
            passes["warm"].append(timed_pass(through, cfg.workers))
    out: dict = {f"{p}_ips": max(v) for p, v in passes.items()}
    out["passes"] = passes
    out["images_per_pass"] = local.stream.batch_size * data.steps_per_epoch(local.plan, local.stream, 1)
    out["warm_vs_local"] = out["warm_ips"] / out["local_ips"]
    out["remote_vs_local"] = out["remote_ips"] / out["local_ips"]
    return out


def run_cli(cfg: StorageBenchConfig) -> None:
    r = bench_storage(cfg)
    console.print(f"loader images+targets, {r['images_per_pass']} images per pass, best of {max(1, cfg.repeats)}; "
                  f"targets from {cfg.cache}, images from a local copy of the source")
    for name, key in (("local disk", "local_ips"), ("remote", "remote_ips"), ("remote, local cache cold", "cold_ips"),
                      ("remote, local cache warm", "warm_ips")):
        console.print(f"{name:26s}: {r[key]:9.1f} images/s")
    console.print(f"remote / local disk       : {r['remote_vs_local']:.3f}")
    verdict = "meets" if r["warm_vs_local"] >= 0.8 else "BELOW"
    console.print(f"warm local cache / local  : {r['warm_vs_local']:.3f} ({verdict} target >= 0.8)")
