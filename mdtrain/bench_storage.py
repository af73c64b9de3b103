"""`mdtrain bench-storage`: the trainer's loader (images + targets) reading a cache from a bucket vs
from local disk, measured in one run on the same batches:

    local disk          a local copy of the cache (the reference)
    remote              straight from the bucket, every epoch
    remote, cold        through --local-cache, first pass (downloads each shard once)
    remote, warm        through --local-cache, second pass (reads the local copies)

Target: warm >= 0.8x local disk.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from rich.console import Console

from mdcache import store
from mdcache.config import opt
from mdcache.store import parse_storage_options

from .bench import stream_batches, timed
from .pretrain import PretrainConfig, configure_threads, resolve_device, setup_data

console = Console()


@dataclass
class StorageBenchConfig:
    """Loader throughput from a remote cache (direct, through a cold and a warm --local-cache) vs local disk."""

    cache: str = opt("", "Remote cache directory (e.g. s3://bucket/mdcache/<id>).")
    student: str = opt("vit_tiny_patch16_224", "Student name (only its input size matters here).")
    batch_size: int = opt(16, "Images per batch.")
    batches: int = opt(0, "Timed batches per phase (0: one epoch).")
    workers: int = opt(2, "Loader workers.")
    seed: int = opt(0, "Seed (same batches in every phase).")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE (repeatable).")


def local_copy(cache: store.Cache, dst_root: str) -> str:
    """Download manifest, commit records and committed shards: a local cache with the same id."""
    fs, path = store.url_to_fs(cache.url, cache.storage_options)
    dst = os.path.join(dst_root, cache.manifest["cache_id"])
    files = [store.join(path, store.MANIFEST)] + [f for rec in cache.commits.values()
                                                  for f in [store.join(path, "commits", f"{rec['shard']}.json")]
                                                  + fs.find(store.join(path, rec["path"]))]
    for f in files:
        local = os.path.join(dst, f[len(path):].lstrip("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(f, local)
    return dst


def loader_ips(cfg: StorageBenchConfig, cache_url: str, local_cache: str, batches: int) -> float:
    pcfg = PretrainConfig(cache=cache_url, student=cfg.student, batch_size=cfg.batch_size, workers=cfg.workers,
                          seed=cfg.seed, device="cpu", storage_option=list(cfg.storage_option), local_cache=local_cache)
    setup = setup_data(pcfg, 0, 1, resolve_device("cpu"), "fp32")
    return timed(stream_batches(setup, cfg.workers, batches + 1), 1, lambda b: None)


def bench_storage(cfg: StorageBenchConfig) -> dict:
    configure_threads(resolve_device("cpu"), cfg.workers, 1)
    cache = store.open_cache(cfg.cache, parse_storage_options(cfg.storage_option))
    samples = sum(rec["samples"] for rec in cache.commits.values())
    batches = cfg.batches or max(2, samples // cfg.batch_size - 1)
    with tempfile.TemporaryDirectory(prefix="mdtrain-bench-storage-") as tmp:
        local = local_copy(cache, os.path.join(tmp, "copy"))
        read_through = os.path.join(tmp, "read-through")
        out = {"local_ips": loader_ips(cfg, local, "", batches),
               "remote_ips": loader_ips(cfg, cache.url, "", batches),
               "cold_ips": loader_ips(cfg, cache.url, read_through, batches),
               "warm_ips": loader_ips(cfg, cache.url, read_through, batches)}
    out["warm_vs_local"] = out["warm_ips"] / out["local_ips"]
    out["remote_vs_local"] = out["remote_ips"] / out["local_ips"]
    return out


def run_cli(cfg: StorageBenchConfig) -> None:
    r = bench_storage(cfg)
    console.print(f"loader images+targets from {cfg.cache}")
    for name, key in (("local disk", "local_ips"), ("remote", "remote_ips"), ("remote, local cache cold", "cold_ips"),
                      ("remote, local cache warm", "warm_ips")):
        console.print(f"{name:26s}: {r[key]:9.1f} images/s")
    console.print(f"remote / local disk       : {r['remote_vs_local']:.3f}")
    verdict = "meets" if r["warm_vs_local"] >= 0.8 else "BELOW"
    console.print(f"warm local cache / local  : {r['warm_vs_local']:.3f} ({verdict} target >= 0.8)")
