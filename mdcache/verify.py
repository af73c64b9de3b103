"""`mdcache verify`: every shard's checksums, and (optionally) the teacher re-run on replayed views.

The teacher check is the view-replay contract made executable: decode the source image, replay
the stored crop with `views.replay`, run the same teacher in fp32, and compare with the stored
(decoded) targets after the trainer's LayerNorm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rich.console import Console

from . import codecs, sources, store, views
from . import fs as mfs
from .commands import opt, storage_options_opt
from .devices import use_device
from .lazy import lazy

torch = lazy("torch")

console = Console(stderr=True, soft_wrap=True)  # log files: no line breaks mid-sentence


@dataclass
class VerifyConfig:
    """Check a cache: checksums of every committed shard, and optionally the teacher on replayed views."""

    cache: str = opt(None, "Cache directory (<root>/<cache-id>), local path or fsspec URL.")
    teacher_check: int = opt(0, "Re-run the teacher on this many replayed views and compare with the stored "
                                "targets (0: skip).", ge=0)
    min_cosine: float = opt(0.99, "Teacher check fails if any token's cosine similarity (after LayerNorm) is "
                                  "below this.", ge=-1, le=1)
    teacher_weights: Optional[str] = opt(None, "Teacher weights file, if the cache was made with a weights file.",
                                         old=("--weights",))
    source: Optional[str] = opt(None, "Where the source shards are now, if they moved (same shard names).")
    device: str = opt("auto", "Device for the teacher check.")
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).")


def check_checksums(cache: store.Cache, missing: list[str]) -> list[str]:
    """Every view of every committed shard; all bad shards are reported, not the first."""
    problems = [f"shard {name}: committed, but its data {cache.commits[name]['path']} is missing (deleted?); "
                "re-run the same `mdcache extract` to recompute it" for name in missing]
    for name in cache.shard_names:
        if name in missing:
            continue
        for v in range(cache.commits[name]["views"]):
            try:
                cache.read_encoded(name, v, check=True)
            except store.CacheError as e:
                problems.append(str(e))
    return problems


def teacher_check(cache: store.Cache, n: int, weights: str | None = None, source: str | None = None,
                  device: str = "auto", storage_options: dict | None = None, skip: tuple[str, ...] = ()) -> dict:
    """Fidelity of stored targets vs the fp32 teacher on n replayed views (spread over views and shards)."""
    from .teachers import load_cache_teacher, run_teacher

    teacher = load_cache_teacher(cache, weights=weights, device=use_device(device))
    shard_list = cache.sources()
    if source:
        moved = {s.name: s for s in sources.list_source(source, storage_options)}
        shard_list = [moved.get(s.name, s) for s in shard_list]
    by_name = {s.name: s for s in shard_list}
    meter, size, k_views, done = codecs.FidelityMeter(), cache.image_size, cache.views, 0
    names = [s for s in cache.shard_names if s not in skip]
    per_shard = max(1, -(-n // max(1, len(names))))
    for name in names:
        if done >= n:
            break
        wanted = min(per_shard, n - done)
        stored = {v: cache.read(name, v) for v in range(k_views)}
        index = {key: i for i, key in enumerate(stored[0][0])}
        xs, refs = [], []
        for sample in sources.iter_samples(by_name[name], storage_options):
            if sample.key not in index or sample.data is None:
                continue
            v = (done + len(xs)) % k_views
            i = index[sample.key]
            _, targets, params = stored[v]
            xs.append(views.view_pixels(views.decode_image(sample.data), params[i], size, cache.replay))
            refs.append(torch.from_numpy(targets[i]))
            if len(xs) == wanted:
                break
        if xs:
            fresh = run_teacher(teacher, torch.stack(xs), "fp32").cpu()
            meter.update(fresh, torch.stack(refs))
            done += len(xs)
    return {"views": done, **meter.report()}


def verify(cfg: VerifyConfig) -> dict:
    so = cfg.storage_options
    cache = store.open_cache(cfg.cache, so, records=True)  # the records themselves: the index may be wrong
    _ = cache.calibration  # its arrays (pca's basis) against the manifest's checksums
    missing = cache.missing_data()
    report = {"cache": cache.url, "shards_done": len(cache.commits), "shards_total": len(cache.source_shards),
              "problems": check_checksums(cache, missing), "source_shards": cache.source_shards,
              "committed": sorted(cache.commits), "index_problems": list(cache.index_problems)}
    if cache.index_problems:  # only a shortcut, but a wrong one misleads every reader until rewritten
        report["index_rewritten"] = cache.write_index()
    if cfg.teacher_check:
        weights = mfs.fetch(cfg.teacher_weights, so) if cfg.teacher_weights else None
        tc = teacher_check(cache, cfg.teacher_check, weights, cfg.source, cfg.device, so, skip=tuple(missing))
        report["teacher_check"] = tc
        if not tc.get("views"):
            report["problems"].append("teacher check: no source sample of a committed shard could be read")
        elif tc["min_cosine"] < cfg.min_cosine:
            report["problems"].append(f"teacher check: worst token cosine {tc['min_cosine']:.6f} < {cfg.min_cosine} "
                                      "(targets do not match the teacher on replayed views)")
    return report


def run_cli(cfg: VerifyConfig) -> None:
    report = verify(cfg)
    console.print(f"{report['cache']}: {report['shards_done']}/{report['shards_total']} shards committed, checksums "
                  + ("BAD" if any(not p.startswith("teacher check") for p in report["problems"]) else "OK"))
    tc = report.get("teacher_check")
    if tc and tc.get("views"):
        console.print(f"teacher check on {tc['views']} replayed views: cosine mean {tc['mean_cosine']:.6f} "
                      f"worst {tc['min_cosine']:.6f}, rel-L2 mean {tc['mean_rel_l2']:.5f} worst {tc['max_rel_l2']:.5f}")
    for p in report["index_problems"]:
        console.print(f"[yellow]index:[/] {p}")
    if report["index_problems"]:
        console.print(f"[yellow]index:[/] {store.COMMIT_INDEX} disagreed with the commit records: "
                      + ("rewritten from them" if report.get("index_rewritten") else
                         "could not rewrite it (read-only?); readers fall back to the records where it is wrong"))
    for p in report["problems"]:
        console.print(f"[red]problem:[/] {p}")
    missing = [n["name"] for n in report["source_shards"] if n["name"] not in report["committed"]]
    if missing:
        console.print(f"[yellow]incomplete:[/] {len(missing)} shard(s) not committed: {', '.join(missing[:8])}"
                      + (" ..." if len(missing) > 8 else "") + " (finish with the same `mdcache extract` command)")
    print("FAILED" if report["problems"] else "INCOMPLETE" if missing else "OK")
    if report["problems"] or missing:  # what was checked may be fine, but a trainer would refuse this cache
        raise SystemExit(1)

