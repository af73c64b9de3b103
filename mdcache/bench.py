"""`mdcache bench`: full extraction vs teacher-forward-only throughput, measured in one run on the
same batches. The ratio says how much of the teacher's speed the pipeline (decode, crop, encode,
write, commit) keeps; the target is >= 0.85.

`--no-teacher` measures the CPU side alone, before renting GPUs: the same pipeline with a teacher that
returns zeros of the real teacher's shape (so encoding and writing move the real number of bytes), in
images/s and images/s per core.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from rich.console import Console

from . import sources
from .commands import opt
from .errors import ConfigError
from .extract import ExtractConfig, Prepared, extract, prepare, shard_batches
from .lazy import lazy

torch = lazy("torch")
if TYPE_CHECKING:
    from .teachers import Teacher

console = Console()


@dataclass
class BenchConfig(ExtractConfig):
    """Measure extraction images/s against teacher-forward-only images/s on the same batches."""

    root: str = opt("", "Cache root for the benchmark's extraction (default: a temporary directory, removed after).",
                    old=("--cache",))
    repeats: int = opt(1, "Teacher-only passes over the batches (the best is reported).", ge=1)
    teacher_batches: int = opt(0, "Batches the teacher-only passes time, from the first shards (0: all the "
                                  "extraction's; fewer decode faster, the rate is per view either way).", ge=0)
    json: bool = opt(False, "Print the result as JSON only (`> bench.json` is what `mdcache plan --bench` reads).")
    json_out: str = opt("", "Deprecated: write the JSON to this file (use --json > FILE).", hidden=True)
    no_teacher: bool = opt(False, "Measure the CPU pipeline alone (decode, views, encode, write): the teacher returns "
                                  "noise of its real shape; reports images/s per core.", param="--no-teacher")


def null_teacher(t: Teacher) -> Teacher:
    """The teacher's shape and identity, none of its compute: seeded noise [B, P, D] (not zeros, which Blosc
    would compress to nothing: the writer must move and compress the real number of bytes)."""
    def features(x):
        g = torch.Generator(device=x.device).manual_seed(x.shape[0])
        return torch.randn(x.shape[0], t.num_patches, t.dim, device=x.device, generator=g)

    return replace(t, features=features, identity={**t.identity, "weights": "none (mdcache bench --no-teacher)"})


def cpu_bench(cfg: BenchConfig) -> dict:
    p = prepare(replace(cfg, random_init=True, teacher_weights=None))  # the architecture gives the shape
    p = replace(p, teacher=null_teacher(p.teacher))
    with tempfile.TemporaryDirectory(prefix="mdcache-bench-") as tmp:
        url, summary = extract(replace(cfg, root=tmp), progress=False, prepared=p)
    ips = summary["images"] / summary["seconds"]
    cores = min(max(1, cfg.workers) + 1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)  # the workers decode and crop; the main process encodes and writes
    return {"images": summary["images"], "views": cfg.views, "ips": ips, "cores": cores, "ips_per_core": ips / cores,
            "views_per_s_per_core": ips * cfg.views / cores}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(cfg: BenchConfig, p: Prepared) -> None:
    """The first forwards pay for kernel selection and memory pools: not part of either rate."""
    from .teachers import run_teacher

    x = torch.zeros(cfg.batch_size * cfg.views, 3, p.recipe.image_size, p.recipe.image_size, dtype=torch.uint8)
    for _ in range(2):
        run_teacher(p.teacher, x, p.precision)
        run_teacher(p.teacher, x[:cfg.fidelity_images * cfg.views], "fp32")
    synchronize(p.device)


def device_report(p: Prepared) -> dict:
    if p.device.type != "cuda":
        return {"device": "cpu", "precision": p.precision}
    return {"device": torch.cuda.get_device_name(p.device), "precision": p.precision,
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated(p.device) / 2**20, 1)}


def bench(cfg: BenchConfig) -> dict:
    """Full extraction vs the teacher alone on the same batches, with the same fidelity work (fp32 forwards of
    each shard's first images) in both, after a synchronized warm-up; rates in views/s."""
    from .teachers import run_teacher

    p = prepare(cfg)  # the same setup as extract: weights fetched from any URL, one teacher for both runs
    if p.device.type == "cuda":  # this run's peak, not the largest of every bench in this process
        torch.cuda.reset_peak_memory_stats(p.device)
    warm_up(cfg, p)
    with tempfile.TemporaryDirectory(prefix="mdcache-bench-") as tmp:
        url, summary = extract(replace(cfg, root=cfg.root or tmp), progress=False, prepared=p)
        if summary["reused"]:
            raise ConfigError(f"bench: {url} already had committed shards; use an empty --cache root")
        extract_ips = summary["images"] / summary["seconds"]
        # Teacher-only on the very same batches, decoded beforehand (not timed).
        shards = sources.select(p.shards, cfg.shards)
        batches = []
        for s in shards:  # each shard's first batch carries the fidelity work, as in extraction
            if cfg.teacher_batches and len(batches) >= cfg.teacher_batches:
                break
            batches += [(i == 0, b.images) for i, b in enumerate(shard_batches(s, p.recipe, cfg.batch_size,
                                                                                  p.storage_options)) if b.keys]
        if not batches:
            raise ConfigError(f"bench: no decodable image in the selected shards of {cfg.source}")
        if p.device.type == "cuda":  # pinned, as the extraction's loader hands them over: the same copies
            batches = [(first, b.pin_memory()) for first, b in batches]
        n = sum(len(b) for _, b in batches) // cfg.views
        fidelity = cfg.fidelity_images * cfg.views
        best = float("inf")
        for _ in range(cfg.repeats):
            synchronize(p.device)
            t0 = time.perf_counter()
            for first, b in batches:
                run_teacher(p.teacher, b, p.precision)
                if first and fidelity and p.precision != "fp32":  # as the extractor checks each shard's first views
                    run_teacher(p.teacher, b[:fidelity], "fp32")
            synchronize(p.device)
            best = min(best, time.perf_counter() - t0)
        teacher_ips = n / best
    return {"images": n, "extract_images": summary["images"], "views": cfg.views, "teacher_only_ips": teacher_ips,
            "extract_ips": extract_ips, "teacher_only_views_per_s": teacher_ips * cfg.views,
            "extract_views_per_s": extract_ips * cfg.views, "ratio": extract_ips / teacher_ips, "target": 0.85,
            "cache": url, "overhead_share": summary["overhead_seconds"] / max(summary["shard_seconds"], 1e-9),
            "data_wait": summary["wait_seconds"] / summary["seconds"], **device_report(p)}


def save(cfg: BenchConfig, r: dict) -> bool:
    """--json: the result on stdout, nothing else (what `mdcache plan --bench` reads); True if printed."""
    import json

    out = {**r, "teacher": cfg.teacher, "codec": cfg.codec, "no_teacher": cfg.no_teacher}
    if cfg.json_out:  # the deprecated form: a file
        Console(stderr=True).print("[yellow]warning:[/] --json-out FILE is now --json (> FILE); it works for this "
                                   "release", highlight=False)
        with open(cfg.json_out, "w") as f:
            json.dump(out, f, indent=1)
    if cfg.json:
        print(json.dumps(out, indent=1))
    return cfg.json


def run_cli(cfg: BenchConfig) -> None:
    if cfg.no_teacher:
        r = cpu_bench(cfg)
        if save(cfg, r):
            return
        console.print(f"images: {r['images']} x {r['views']} views, {cfg.teacher}'s output shape, codec {cfg.codec}, "
                      f"{cfg.workers} worker(s)")
        console.print(f"CPU pipeline, no teacher: {r['ips']:8.2f} images/s on {r['cores']} cores = "
                      f"{r['ips_per_core']:.2f} images/s ({r['views_per_s_per_core']:.1f} views/s) per core")
        return
    r = bench(cfg)
    if save(cfg, r):
        return
    console.print(f"images: {r['images']} x {r['views']} views ({r['extract_images']} extracted), "
                  f"teacher {cfg.teacher}, codec {cfg.codec}")
    console.print(f"teacher forward only : {r['teacher_only_ips']:8.2f} images/s = "
                  f"{r['teacher_only_views_per_s']:9.1f} views/s ({r['device']}, {r['precision']})")
    console.print(f"full extraction      : {r['extract_ips']:8.2f} images/s = {r['extract_views_per_s']:9.1f} views/s"
                  + (f", peak GPU memory {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""))
    verdict = "meets" if r["ratio"] >= r["target"] else "BELOW"
    console.print(f"ratio extraction/teacher-only: {r['ratio']:.3f} ({verdict} target >= {r['target']}); the "
                  f"teacher waited for the workers {r['data_wait']:.0%} of the time")
    share = r["overhead_share"]
    console.print(f"claims + commit records: {100 * share:.2f}% of shard time "
                  f"({'meets' if share < 0.02 else 'ABOVE'} target < 2%) on {r['cache'].rsplit('/', 1)[0]}")
