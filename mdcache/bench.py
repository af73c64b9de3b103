"""`mdcache bench`: full extraction vs teacher-forward-only throughput, measured in one run on the
same batches. The ratio says how much of the teacher's speed the pipeline (decode, crop, encode,
write, commit) keeps; the target is >= 0.85.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace

import torch
from rich.console import Console

from . import sources
from .commands import opt
from .errors import ConfigError
from .extract import ExtractConfig, extract, prepare, shard_batches
from .teachers import run_teacher

console = Console()


@dataclass
class BenchConfig(ExtractConfig):
    """Measure extraction images/s against teacher-forward-only images/s on the same batches."""

    cache: str = opt("", "Cache root for the benchmark's extraction (default: a temporary directory, removed after).")
    repeats: int = opt(1, "Teacher-only passes over the batches (the best is reported).")


def bench(cfg: BenchConfig) -> dict:
    p = prepare(cfg)  # the same setup as extract: weights fetched from any URL, one teacher for both runs
    with tempfile.TemporaryDirectory(prefix="mdcache-bench-") as tmp:
        url, summary = extract(replace(cfg, cache=cfg.cache or tmp), progress=False, prepared=p)
        if summary["reused"]:
            raise ConfigError(f"bench: {url} already had committed shards; use an empty --cache root")
        extract_ips = summary["images"] / summary["seconds"]
        # Teacher-only on the very same batches, decoded beforehand (not timed).
        shards = sources.select(p.shards, cfg.shards)
        batches = [b.images for s in shards for b in shard_batches(s, p.recipe, p.teacher.mean, p.teacher.std,
                                                                    cfg.batch_size, p.storage_options) if b.keys]
        if not batches:
            raise ConfigError(f"bench: no decodable image in the selected shards of {cfg.source}")
        n = sum(len(b) for b in batches) // cfg.views
        run_teacher(p.teacher, batches[0], p.precision)  # warm-up
        best = float("inf")
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            for b in batches:
                run_teacher(p.teacher, b, p.precision)
            if p.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        teacher_ips = n / best
    return {"images": n, "extract_images": summary["images"], "views": cfg.views, "teacher_only_ips": teacher_ips,
            "extract_ips": extract_ips, "ratio": extract_ips / teacher_ips, "target": 0.85, "cache": url,
            "overhead_share": summary["overhead_seconds"] / max(summary["shard_seconds"], 1e-9)}


def run_cli(cfg: BenchConfig) -> None:
    r = bench(cfg)
    console.print(f"images: {r['images']} x {r['views']} views ({r['extract_images']} extracted), "
                  f"teacher {cfg.teacher}, codec {cfg.codec}")
    console.print(f"teacher forward only : {r['teacher_only_ips']:8.2f} images/s")
    console.print(f"full extraction      : {r['extract_ips']:8.2f} images/s")
    verdict = "meets" if r["ratio"] >= r["target"] else "BELOW"
    console.print(f"ratio extraction/teacher-only: {r['ratio']:.3f} ({verdict} target >= {r['target']})")
    share = r["overhead_share"]
    console.print(f"claims + commit records: {100 * share:.2f}% of shard time "
                  f"({'meets' if share < 0.02 else 'ABOVE'} target < 2%) on {r['cache'].rsplit('/', 1)[0]}")
