"""`mdcache bench`: full extraction vs teacher-forward-only throughput, measured in one run on the
same batches. The ratio says how much of the teacher's speed the pipeline (decode, crop, encode,
write, commit) keeps; the target is >= 0.85.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace

from rich.console import Console

from . import sources
from .config import opt
from .extract import ExtractConfig, extract, shard_batches
from .teachers import load_teacher, resolve_device, resolve_precision, run_teacher

console = Console()


@dataclass
class BenchConfig(ExtractConfig):
    """Measure extraction images/s against teacher-forward-only images/s on the same batches."""

    cache: str = opt("", "Cache root for the benchmark's extraction (default: a temporary directory, removed after).")
    repeats: int = opt(1, "Teacher-only passes over the batches (the best is reported).")


def bench(cfg: BenchConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="mdcache-bench-") as tmp:
        run_cfg = replace(cfg, cache=cfg.cache or tmp)
        url, summary = extract(run_cfg, progress=False)
        if summary["reused"]:
            raise RuntimeError(f"bench: {url} already had committed shards; use an empty --cache root")
        extract_ips = summary["images"] / summary["seconds"]
        # Teacher-only on the very same batches, decoded beforehand (not timed).
        so = cfg.storage_options()
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device)
        teacher = load_teacher(cfg.teacher, weights=cfg.weights, random_init=cfg.random_init, tap=cfg.tap,
                               image_size=cfg.image_size, device=device, seed=cfg.seed)
        recipe = cfg.recipe(teacher.image_size)
        shards = sources.select(sources.list_source(cfg.source, so, cfg.folder_shard_size), cfg.shards)
        batches = [b["images"] for s in shards for b in shard_batches(s, recipe, teacher.mean, teacher.std,
                                                                        cfg.batch_size, so) if len(b["keys"])]
        n = sum(len(b) for b in batches) // cfg.views
        run_teacher(teacher, batches[0], precision)  # warm-up
        best = float("inf")
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            for b in batches:
                run_teacher(teacher, b, precision)
            if device.type == "cuda":
                import torch
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        teacher_ips = n / best
    return {"images": n, "views": cfg.views, "teacher_only_ips": teacher_ips, "extract_ips": extract_ips,
            "ratio": extract_ips / teacher_ips, "target": 0.85, "cache": url,
            "overhead_share": summary["overhead_seconds"] / max(summary["shard_seconds"], 1e-9)}


def run_cli(cfg: BenchConfig) -> None:
    r = bench(cfg)
    console.print(f"images: {r['images']} x {r['views']} views, teacher {cfg.teacher}, codec {cfg.codec}")
    console.print(f"teacher forward only : {r['teacher_only_ips']:8.2f} images/s")
    console.print(f"full extraction      : {r['extract_ips']:8.2f} images/s")
    verdict = "meets" if r["ratio"] >= r["target"] else "BELOW"
    console.print(f"ratio extraction/teacher-only: {r['ratio']:.3f} ({verdict} target >= {r['target']})")
    share = r["overhead_share"]
    console.print(f"claims + commit records: {100 * share:.2f}% of shard time "
                  f"({'meets' if share < 0.02 else 'ABOVE'} target < 2%) on {r['cache'].rsplit('/', 1)[0]}")
