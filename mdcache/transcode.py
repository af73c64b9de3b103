"""`mdcache transcode`: a new cache from an existing one, in another codec, without a teacher.

A team extracts fp16 (or int8) once and derives smaller caches per experiment: same keys, same
views, new codec, recalibrated from the decoded source. The new cache's fingerprint is the source's
with the new codec and the source's id, so it is found by what produced it like any other, and its
fidelity is measured against the decoded source. Claims, commits and resume are extract's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from . import codecs, sources, store
from . import fs as mfs
from .claims import Claims
from .commands import check_options, opt, storage_options_opt
from .devices import use_device
from .errors import CacheError, ConfigError
from .extract import Batch, console, open_or_create_cache, report, resume, run_claimed, shard_pass
from .lazy import lazy
from .progress import live_default

torch = lazy("torch")


@dataclass
class TranscodeConfig:
    """Make a cache in another codec from an existing cache: same views and keys, no teacher."""

    src: str = opt(None, "Source cache (<root>/<cache-id>), local path or fsspec URL; fp16 or int8 is best.")
    codec: str = opt("", "The new cache's codec: int8, int4, pca:R (e.g. pca:192) or fp16.", required=True)
    root: Optional[str] = opt(None, "Cache root for the new cache (default: the source's root).", old=("--cache",))
    shards: Optional[str] = opt(None, "Subset of source shards to transcode: 'start:stop' or 'i,j,k'.")
    calib_images: int = opt(store.CALIB_IMAGES, "Images (the source's first committed ones, all their views) to "
                                                "calibrate on (part of the new cache's identity).", ge=1)
    fidelity_images: int = opt(8, "Images per shard whose new targets are compared with the decoded source.", ge=0)
    batch_size: int = opt(64, "Images decoded and encoded at a time.", ge=1)
    device: str = opt("auto", "Device for decoding and encoding: auto, cpu, cuda, cuda:N.")
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE for both caches (repeatable).")
    claim_ttl: float = opt(600.0, "Seconds a shard claim lives without renewal (as extract).", gt=0)
    wait: bool = opt(True, "Wait for shards other transcoders hold claims on (as extract).")


def fingerprint(src: store.Cache, codec: str, calib_images: int = store.CALIB_IMAGES) -> dict:
    """The source's fingerprint with the new codec, naming the source: what produced these targets. Always
    of the current format (a format-1 source's K leaves the identity: the new cache can grow with it)."""
    fp = src.manifest["fingerprint"]
    return {**fp, "format_version": store.FORMAT_VERSION,
            "views": {k: v for k, v in fp["views"].items() if k != "views"},
            "codec": store.codec_identity(codec, calib_images),
            "transcoded_from": {"cache_id": src.cache_id, "codec": src.codec}}


def encoded_rows(src: store.Cache, per_view: list[dict[str, np.ndarray]], rows: slice, device) -> dict:
    """Encoded arrays of images `rows`, all views, image-major ([n*K, ...], as the teacher's batches are)."""
    return {a: torch.from_numpy(np.stack([v[a][rows] for v in per_view], 1)).flatten(0, 1).to(device)
            for a in per_view[0]}


def calibrate(cfg: TranscodeConfig, src: store.Cache, device) -> dict | None:
    """The new codec's calibration from the decoded targets of the source's first committed images, their
    first CALIB_VIEWS views (as extract: a cache that grows keeps its calibration)."""
    views = min(store.CALIB_VIEWS, src.views)

    def batches() -> Iterator[tuple[int, torch.Tensor]]:
        n = 0
        for shard in src.shard_names:
            per_view = [src.read_encoded(shard, v)[1] for v in range(views)]
            feats = src.decode(encoded_rows(src, per_view, slice(0, cfg.calib_images - n), device))
            n += len(feats) // views
            if len(feats):
                yield len(feats) // views, feats

    return codecs.calibrate_on(cfg.codec, batches(), cfg.calib_images, lambda: CacheError(
        f"{src.url}: no committed images to calibrate the {cfg.codec} codec on"))


def default_root(src_url: str) -> str:
    """The folder (or bucket prefix) holding the source cache."""
    if "://" in src_url:
        return src_url.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(src_url.rstrip("/")))


def open_or_create(cfg: TranscodeConfig, src: store.Cache, device) -> store.Cache:
    codec = codecs.get_codec(cfg.codec)
    fp = fingerprint(src, codec.name, cfg.calib_images)
    url = mfs.join(cfg.root or default_root(src.url), store.cache_id(fp))
    m = src.manifest
    tokens = int(m["teacher"]["tokens"])
    codec.shapes(tokens, src.teacher_dim)  # refused now (odd channels for int4, R too large), not after calibrating

    def manifest() -> dict:
        calibration = store.put_calibration(url, calibrate(cfg, src, device), cfg.storage_options)
        return {**m, "format_version": store.FORMAT_VERSION, "cache_id": store.cache_id(fp), "fingerprint": fp,
                "codec": store.codec_record(codec.name, calibration, tokens, src.teacher_dim),
                "transcoded_from": {"cache": src.url, "cache_id": src.cache_id, "codec": src.codec},
                "views_drawn_by": store.views_root(m),  # its views are its source's
                "created_by": mfs.who(), "created_at": mfs.now(), "versions": store.software_versions()}

    return open_or_create_cache(url, fp, cfg.storage_options, manifest,
                                f" ({src.codec} -> {codec.name}, from {src.cache_id})")


def transcode(cfg: TranscodeConfig, progress: bool = True) -> tuple[str, dict]:
    """Returns (new cache URL, summary), as extract does."""
    if not cfg.src:
        raise ConfigError("say which cache to transcode: mdcache transcode SRC --codec CODEC")
    check_options(cfg)
    codecs.get_codec(cfg.codec)
    src = store.open_cache(cfg.src, cfg.storage_options)
    if codecs.get_codec(cfg.codec).identity == codecs.get_codec(src.codec).identity:
        raise ConfigError(f"{src.url} is already {src.codec}")
    device = use_device(cfg.device)
    selected = sources.select(src.sources(), cfg.shards)  # a bad --shards is refused before a cache exists
    cache = open_or_create(cfg, src, device)
    missing = [s.name for s in selected if s.name not in src.commits]
    if missing:
        console.print(f"[yellow]warning:[/] {len(missing)} selected shard(s) are not committed in the source cache "
                      f"yet (first: {missing[0]}); transcoding the other {len(selected) - len(missing)}")
    todo, summary = resume(cache, [s for s in selected if s.name in src.commits], src.views)
    if todo:
        run_claimed(cache, todo, summary, lambda todo, claims: run_pass(cfg, src, cache, todo, summary, device,
                                                                         progress, claims),
                    cfg.claim_ttl, cfg.wait, src.views)
    summary["not_in_source"] = missing
    return cache.url, summary


def run_pass(cfg: TranscodeConfig, src: store.Cache, cache: store.Cache, todo: list[sources.SourceShard],
             summary: dict, device, progress: bool, claims: Claims) -> None:
    k = src.views
    with shard_pass("transcode", cache, k, claims, todo, summary, cfg.fidelity_images, progress) as (meter, writer):
        for shard in todo:
            why_not = claims.acquire(shard.name, store.stem_of(shard.name, k))
            if why_not:
                if why_not != "committed":
                    summary["elsewhere"][shard.name] = why_not
                meter.advance()
                continue
            first = summary["grow"].get(shard.name, 0)  # views the new cache holds already
            try:
                with meter.waiting():  # the input side: reading the source cache
                    reads = [src.read_encoded(shard.name, v, targets=v >= first) for v in range(k)]
            except CacheError as e:  # a damaged source shard: named, the rest goes on
                writer.add(Batch(shard.name, last=True, error=str(e)))
                continue
            keys, per_view = reads[0][0], [r[1] for r in reads[first:]]
            params = np.stack([r[2] for r in reads], 1)  # [N, K, fields]
            skipped = list(src.commits[shard.name].get("skipped", []))
            for i in range(0, max(len(keys), 1), cfg.batch_size):
                rows = slice(i, i + cfg.batch_size)
                b = Batch(shard.name, keys=keys[rows], skipped=skipped if i == 0 else [],
                          last=i + cfg.batch_size >= len(keys), first_view=first)
                feats = None
                if b.keys:
                    b.views = params[rows]
                    feats = src.decode(encoded_rows(src, per_view, rows, device))
                    meter.count(len(b.keys))
                m = writer.fidelity_views(b) if b.keys else 0
                writer.add(b, feats, feats[:m] if m else None)
                meter.report()


def run_cli(cfg: TranscodeConfig) -> None:
    url, summary = transcode(cfg, progress=live_default())
    report(url, summary, "transcoder")
