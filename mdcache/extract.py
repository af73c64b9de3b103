"""`mdcache extract`: run the teacher once over K views of every image and commit targets per shard.

Workers decode and replay views (one worker per shard at a time, so a shard's batches arrive in
order); the main process runs the teacher; a writer thread encodes-to-Zarr and commits while the
next batches compute. Committed shards are skipped, so re-running the same command resumes.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import codecs, sources, store, views
from .store import parse_storage_options
from .claims import Claims, Renewer, new_owner
from .config import opt, parse_floats
from .teachers import Teacher, load_teacher, resolve_device, resolve_precision, run_teacher

console = Console(stderr=True)


@dataclass
class ExtractConfig:
    """Run a frozen teacher once over K augmented views per image and cache its patch features."""

    source: str = opt("", "Source: WebDataset tars (brace pattern, glob, comma list; local or fsspec URL) or an image folder.")
    teacher: str = opt("clip-b16", "Teacher: clip-b16, clip-l14, open_clip:ARCH[:PRETRAINED] (ARCH may be a config .json), timm:MODEL.")
    cache: str = opt("./cache", "Cache root (local path or fsspec URL); the cache lands in <root>/<cache-id>/.")
    views: int = opt(2, "Views (augmented crops) stored per image.")
    codec: str = opt("int8", "Target codec: int8 (per-channel calibrated, per-token scale) or fp16 (reference).")
    tap: str = opt("final", "Teacher feature: final (last block, before ln_post), ln_post, or proj (ln_post + CLIP projection).")
    image_size: int = opt(224, "Teacher/student input size in pixels.")
    crop_scale: str = opt("0.2,1.0", "RandomResizedCrop area scale range 'min,max'.")
    crop_ratio: str = opt("0.75,1.3333333333", "RandomResizedCrop aspect ratio range 'min,max'.")
    flip: bool = opt(True, "Random horizontal flip (p=0.5), recorded per view.")
    color_jitter: float = opt(0.0, "ColorJitter strength for brightness, contrast and saturation (0: off; BEiT v2 uses 0.4), recorded per view.")
    seed: int = opt(0, "Seed for view sampling (per image key, so independent of sharding and workers).")
    weights: Optional[str] = opt(None, "Teacher weights file (.safetensors/.bin/.pt state dict), a path or fsspec URL.")
    random_init: bool = opt(False, "Use randomly initialised teacher weights (tests/demos only; recorded in the fingerprint).")
    shards: Optional[str] = opt(None, "Subset of source shards to compute: 'start:stop' or 'i,j,k' (the cache id is unchanged).")
    folder_shard_size: int = opt(1000, "Images per virtual shard when the source is an image folder.")
    batch_size: int = opt(32, "Images per teacher batch (each contributes --views crops).")
    workers: int = opt(2, "DataLoader worker processes decoding and cropping images.")
    device: str = opt("auto", "Device: auto (CUDA if available, LOCAL_RANK under torchrun), cpu, cuda, cuda:N.")
    precision: str = opt("auto", "Teacher precision: auto (bf16 on CUDA with bf16 support, else fp32), fp32, bf16.")
    calib_images: int = opt(64, "Images (from the first source shard) used to calibrate the int8 codec.")
    fidelity_images: int = opt(8, "Images per shard whose targets are checked against the fp32 teacher for the fidelity report.")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE for the cache and source (repeatable), e.g. endpoint_url=...")
    claim_ttl: float = opt(600.0, "Seconds a shard claim lives without renewal; a dead extractor's shards are taken over after it.")
    wait: bool = opt(True, "When other extractors hold claims on the remaining shards, wait for them (and take over expired claims).")

    def recipe(self, image_size: int) -> views.ViewRecipe:
        return views.ViewRecipe(image_size=image_size, scale=parse_floats(self.crop_scale, 2, "--crop-scale"),
                                ratio=parse_floats(self.crop_ratio, 2, "--crop-ratio"), flip=self.flip,
                                views=self.views, seed=self.seed, color_jitter=self.color_jitter)

    def storage_options(self) -> dict:
        return parse_storage_options(self.storage_option)


# ----------------------------------------------------------------------------- data

def image_views(sample: sources.Sample, recipe: views.ViewRecipe, mean, std) -> tuple[torch.Tensor, np.ndarray]:
    """Decode one sample and produce its K views: (images [K,3,S,S], params [K,7])."""
    image = views.decode_image(sample.data)
    params = views.sample_views(sample.key, image.height, image.width, recipe)
    x = torch.stack([views.to_tensor(views.replay(image, p, recipe.image_size), mean, std) for p in params])
    return x, params


def empty_batch(shard: str, recipe: views.ViewRecipe, **kw) -> dict:
    s = recipe.image_size
    return {"shard": shard, "keys": [], "skipped": [], "last": True, "error": None, "skip": None, "claim_seconds": 0.0,
            "images": torch.zeros(0, 3, s, s), "views": np.zeros((0, recipe.views, len(views.VIEW_FIELDS)), np.int32), **kw}


def shard_batches(shard: sources.SourceShard, recipe: views.ViewRecipe, mean, std, batch_size: int,
                  storage_options: dict | None = None) -> Iterator[dict]:
    """Batches of one shard, in order. The last one has last=True (and error= if the shard broke)."""
    keys, imgs, params, skipped = [], [], [], []

    def batch(last: bool, error: str | None = None) -> dict:
        out = empty_batch(shard.name, recipe, last=last, error=error, keys=list(keys), skipped=list(skipped))
        if keys:
            out["images"], out["views"] = torch.cat(imgs), np.stack(params)
        keys.clear(), imgs.clear(), params.clear(), skipped.clear()
        return out

    try:
        for sample in sources.iter_samples(shard, storage_options):
            if sample.data is None:
                skipped.append({"key": sample.key, "error": "no image member (.jpg/.jpeg/.png/.webp)"})
                continue
            try:
                x, p = image_views(sample, recipe, mean, std)
            except Exception as e:  # undecodable image: skip, count, list; never drop silently
                skipped.append({"key": sample.key, "error": f"{type(e).__name__}: {e}"})
                continue
            keys.append(sample.key), imgs.append(x), params.append(p)
            if len(keys) == batch_size:
                yield batch(False)
    except sources.SourceError as e:
        yield batch(True, str(e))
        return
    yield batch(True)


class ShardStream(torch.utils.data.IterableDataset):
    """Each DataLoader worker takes whole shards (i, i+W, ...), so a shard's batches stay ordered."""

    def __init__(self, shards, recipe, mean, std, batch_size, storage_options=None, claims: Claims | None = None):
        self.shards, self.recipe, self.mean, self.std = shards, recipe, mean, std
        self.batch_size, self.storage_options, self.claims = batch_size, storage_options, claims

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for shard in self.shards[wid::nw]:
            t0 = time.perf_counter()
            why_not = self.claims.acquire(shard.name) if self.claims else None
            claim_seconds = time.perf_counter() - t0
            if why_not:  # committed meanwhile, or another extractor is on it
                yield empty_batch(shard.name, self.recipe, skip=why_not)
                continue
            for b in shard_batches(shard, self.recipe, self.mean, self.std, self.batch_size, self.storage_options):
                b["claim_seconds"], claim_seconds = claim_seconds, 0.0  # reported once, with the first batch
                yield b


# ----------------------------------------------------------------------------- cache setup

def fingerprint(teacher: Teacher, recipe: views.ViewRecipe, all_shards: list[sources.SourceShard],
                codec: str, precision: str) -> dict:
    return {"format_version": store.FORMAT_VERSION, "teacher": {**teacher.identity, "precision": precision},
            "views": recipe.identity(), "source": sources.identity(all_shards), "codec": codecs.codec_identity(codec)}


def calibrate(cfg: ExtractConfig, teacher: Teacher, recipe, shard: sources.SourceShard, precision: str,
              so: dict) -> dict | None:
    """Codec calibration from the first images of the first source shard: deterministic, so every
    extractor of this cache (resumed, concurrent, other ranks) derives the same numbers."""
    if cfg.codec != "int8":
        return None
    feats, n = [], 0
    for b in shard_batches(shard, recipe, teacher.mean, teacher.std, min(cfg.batch_size, cfg.calib_images), so):
        if b["error"]:
            raise sources.SourceError(b["error"])
        if len(b["keys"]):
            feats.append(run_teacher(teacher, b["images"], precision).cpu())
            n += len(b["keys"])
        if n >= cfg.calib_images or b["last"]:
            break
    if not feats:
        raise sources.SourceError(f"{shard.url}: no decodable image to calibrate the int8 codec on")
    return codecs.calibrate(cfg.codec, torch.cat(feats))


def open_or_create(cfg: ExtractConfig, teacher: Teacher, recipe, all_shards, precision: str, so: dict) -> store.Cache:
    fp = fingerprint(teacher, recipe, all_shards, cfg.codec, precision)
    cid = store.cache_id(fp)
    url = store.join(cfg.cache, cid)
    try:
        cache = store.open_cache(url, so)
        if cache.manifest["fingerprint"] != fp:
            raise store.CacheError(f"{url}: manifest fingerprint differs from this run's (id collision or tampering)")
        return cache
    except store.CacheError as e:
        if "no manifest.json" not in str(e):
            raise
    check_writable(url, so)
    console.print(f"[bold]new cache[/] {url}" + (" (calibrating int8 codec)" if cfg.codec == "int8" else ""))
    calib = calibrate(cfg, teacher, recipe, all_shards[0], precision, so)
    manifest = {"format_version": store.FORMAT_VERSION, "cache_id": cid, "fingerprint": fp,
                "codec": {"name": cfg.codec, "calibration": calib, "arrays": codecs.CODEC_ARRAYS[cfg.codec]},
                "teacher": {"spec": teacher.spec, "dim": teacher.dim, "patch_grid": list(teacher.patch_grid),
                            "tokens": teacher.num_patches, "mean": list(teacher.mean), "std": list(teacher.std)},
                "views": recipe.views, "image_size": recipe.image_size, "view_fields": list(views.VIEW_FIELDS),
                "source": {"spec": cfg.source, "shards": [s.to_json() for s in all_shards],
                           "classes": list(all_shards[0].classes)},
                "created_by": store.who(), "created_at": store.now(), "versions": _versions()}
    store.create_manifest(url, manifest, so)
    return store.open_cache(url, so)


def _versions() -> dict:
    import PIL
    import open_clip
    import timm

    from . import __version__
    return {"mdcache": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


# ----------------------------------------------------------------------------- the loop

class ShardBuffer:
    """Encoded targets of one shard, accumulated batch by batch until its last batch arrives."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.views: list[np.ndarray] = []
        self.skipped: list[dict] = []
        self.meter = codecs.FidelityMeter()
        self.started = time.time()
        self.overhead = 0.0

    def add(self, b: dict, encoded: dict[str, np.ndarray], k: int) -> None:
        n = len(b["keys"])
        self.keys += b["keys"]
        self.skipped += b["skipped"]
        self.views.append(b["views"])
        for name, a in encoded.items():  # [n*K, ...] -> [n, K, ...]
            self.arrays.setdefault(name, []).append(a.reshape(n, k, *a.shape[1:]))

    def stacked(self, k: int, shapes: dict[str, tuple]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """[K, N, ...] arrays: view-major, so one view of the shard is contiguous."""
        out = {}
        for name, (dtype, shape) in shapes.items():
            parts = self.arrays.get(name) or [np.zeros((0, k) + shape, dtype)]
            out[name] = np.ascontiguousarray(np.concatenate(parts).swapaxes(0, 1))
        views_ = np.concatenate(self.views) if self.views else np.zeros((0, k, len(views.VIEW_FIELDS)), np.int32)
        return out, np.ascontiguousarray(views_.swapaxes(0, 1))


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def extract(cfg: ExtractConfig, progress: bool = True) -> tuple[str, dict]:
    """Run an extraction; returns (cache URL, summary). Raises on setup errors, reports shard errors."""
    so = cfg.storage_options()
    codecs.check_codec(cfg.codec)
    all_shards = sources.list_source(cfg.source, so, cfg.folder_shard_size)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    teacher = load_teacher(cfg.teacher, weights=store.fetch(cfg.weights, so) if cfg.weights else None,
                           random_init=cfg.random_init, tap=cfg.tap,
                           image_size=cfg.image_size, device=device, seed=cfg.seed)
    if cfg.random_init:
        console.print("[yellow]warning:[/] teacher uses RANDOM weights (--random-init): targets are for tests/demos only")
    recipe = cfg.recipe(teacher.image_size)
    cache = open_or_create(cfg, teacher, recipe, all_shards, precision, so)
    rank, world = rank_world()
    selected = sources.select(all_shards, cfg.shards)[rank::world]
    todo = [s for s in selected if s.name not in cache.commits]
    reused = len(selected) - len(todo)
    if reused:
        console.print(f"reusing {reused} committed shard(s) of {len(selected)} selected; computing {len(todo)}")
    summary = {"cache": cache.url, "reused": reused, "committed": [], "lost_race": [], "failed": {}, "skipped": 0,
               "images": 0, "seconds": 0.0, "elsewhere": {}, "overhead_seconds": 0.0, "shard_seconds": 0.0}
    if not todo:
        return cache.url, summary
    check_writable(cache.url, so)
    claims = Claims(cache.url, new_owner(), cfg.claim_ttl, so)
    renewer = Renewer(claims)
    renewer.start()
    try:
        while todo:
            summary["elsewhere"] = {}
            _run(cfg, teacher, recipe, cache, todo, precision, so, summary, progress, claims)
            cache.refresh()
            todo = [s for s in todo if s.name not in cache.commits and s.name not in summary["failed"]]
            if not todo or not cfg.wait:
                break
            owners = sorted(set(summary["elsewhere"].values()))
            console.print(f"waiting for {len(todo)} shard(s) claimed by {', '.join(owners) or 'others'} "
                          f"(taken over if their claims expire; --no-wait to stop instead)")
            time.sleep(min(max(cfg.claim_ttl / 4, 0.5), 30.0))
    finally:
        renewer.stop()
    return cache.url, summary


def check_writable(cache_url: str, so: dict) -> None:
    """Fail early, with a clear message, when the credentials cannot write to the cache."""
    fs, path = store.url_to_fs(cache_url, so)
    probe = store.join(path, "claims", f".write-probe-{new_owner().replace(':', '-').replace('@', '-')}")
    try:
        store.write_json(fs, probe, {})
        fs.rm(probe)
    except PermissionError as e:
        raise store.CacheError(f"no write access to {cache_url} ({e}); these credentials can list, verify and "
                               "train from the cache, but extracting needs write permission") from None


def _run(cfg, teacher, recipe, cache, todo, precision, so, summary, progress, claims: Claims | None) -> None:
    k = recipe.views
    shapes = {name: (dtype, (teacher.num_patches, teacher.dim)[:rank - 1])
              for name, (dtype, rank) in codecs.CODEC_ARRAYS[cfg.codec].items()}
    calib = cache.calibration
    by_name = {s.name: s for s in todo}
    loader = torch.utils.data.DataLoader(
        ShardStream(todo, recipe, teacher.mean, teacher.std, cfg.batch_size, so, claims), batch_size=None,
        num_workers=min(cfg.workers, len(todo)), persistent_workers=False,
        prefetch_factor=4 if cfg.workers else None)
    buffers: dict[str, ShardBuffer] = {}
    pending: list[Future] = []
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdcache-writer")

    def commit(name: str, buf: ShardBuffer) -> None:
        arrays, views_ = buf.stacked(k, shapes)
        extra = {"fidelity": buf.meter.report(), "skipped": buf.skipped, "seconds": round(time.time() - buf.started, 3),
                 "source": by_name[name].to_json(), "rank": rank_world()[0],
                 "extractor": claims.owner if claims else store.who()}
        rec = store.write_shard_data(cache.url, name, buf.keys, arrays, views_, extra, so)
        t0 = time.perf_counter()
        won = store.commit_shard(cache.url, rec, so)
        if claims:
            claims.release(name)
        buf.overhead += time.perf_counter() - t0  # coordination cost: claim + commit record + release
        summary["overhead_seconds"] += buf.overhead
        summary["shard_seconds"] += time.time() - buf.started
        (summary["committed"] if won else summary["lost_race"]).append(name)
        if not progress:  # logs (no live bar): one line per shard
            console.print(f"shard {name}: {'committed' if won else 'already committed by another extractor'}, "
                          f"{len(buf.keys)} images, {len(buf.skipped)} skipped, {extra['seconds']:.1f}s")

    columns = [TextColumn("[bold]extract[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
               TextColumn("{task.fields[ips]:.1f} img/s"), TextColumn("{task.fields[imgs]} imgs"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    t0, images = time.time(), 0
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("extract", total=len(todo), ips=0.0, imgs=0)
        for b in loader:
            name = b["shard"]
            if b["skip"]:
                if b["skip"] != "committed":
                    summary["elsewhere"][name] = b["skip"]
                bar.advance(task)
                continue
            buf = buffers.setdefault(name, ShardBuffer())
            buf.overhead += b["claim_seconds"]
            if len(b["keys"]):
                feats = run_teacher(teacher, b["images"], precision)
                encoded = codecs.encode(cfg.codec, feats, calib)
                if buf.meter.tokens == 0:  # fidelity on the shard's first images, against fp32
                    m = min(len(b["keys"]), cfg.fidelity_images) * k
                    ref = feats[:m] if precision == "fp32" else run_teacher(teacher, b["images"][:m], "fp32")
                    dec = codecs.decode(cfg.codec, {a: torch.from_numpy(v[:m]) for a, v in encoded.items()}, calib)
                    buf.meter.update(ref.cpu(), dec)
                buf.add(b, encoded, k)
                images += len(b["keys"])
            else:
                buf.skipped += b["skipped"]
            if b["last"]:
                buffers.pop(name)
                summary["skipped"] += len(buf.skipped)
                if b["error"]:
                    summary["failed"][name] = b["error"]
                    if claims:
                        claims.release(name)
                    console.print(f"[red]shard failed:[/] {b['error']}")
                else:
                    pending.append(writer.submit(commit, name, buf))
                    pending = _drain(pending, keep=1, bar=bar, task=task)
            bar.update(task, ips=images / max(time.time() - t0, 1e-9), imgs=images)
        _drain(pending, keep=0, bar=bar, task=task)
    writer.shutdown()
    summary["images"] += images
    summary["seconds"] += time.time() - t0


def _drain(pending: list[Future], keep: int, bar, task) -> list[Future]:
    """Bound memory: wait until at most `keep` shard writes are in flight (and surface their errors)."""
    while len(pending) > keep:
        pending.pop(0).result()
        bar.advance(task)
    still = []
    for f in pending:
        if f.done():
            f.result()
            bar.advance(task)
        else:
            still.append(f)
    return still


def run_cli(cfg: ExtractConfig) -> None:
    url, summary = extract(cfg, progress=sys.stderr.isatty() or bool(os.environ.get("MDCACHE_PROGRESS")))
    done = len(summary["committed"])
    console.print(f"committed {done} shard(s), {summary['images']} images, reused {summary['reused']}, "
                  f"skipped {summary['skipped']} undecodable sample(s)" +
                  (f", {len(summary['lost_race'])} shard(s) committed by another extractor first" if summary["lost_race"] else ""))
    for name, err in summary["failed"].items():
        console.print(f"[red]FAILED[/] shard {name}: {err}")
    if summary["elsewhere"]:
        console.print(f"{len(summary['elsewhere'])} shard(s) left to other extractors holding claims: "
                      + ", ".join(f"{n} ({o})" for n, o in sorted(summary["elsewhere"].items())))
    print(url)
    if summary["failed"]:
        raise SystemExit(1)

