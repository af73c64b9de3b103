"""`mdcache extract`: run the teacher once over K views of every image and commit targets per shard.

Workers decode and replay views (one worker per shard at a time, so a shard's batches arrive in
order) and ship them as uint8 (pinned for a GPU); the main process normalizes them on the device and
runs the teacher; a host thread encodes on the device and copies to the host, and a writer thread
writes the Zarr group and commits, while the next batches compute. Committed shards are skipped, so
re-running the same command resumes.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np
from rich.console import Console

from . import codecs, sources, store, views
from . import fs as mfs
from .claims import Claims, Renewer, new_owner
from .commands import ViewOptions, check_options, model_args_opt, opt, precision_opt, storage_options_opt
from .devices import resolve_precision, use_device
from .errors import CacheError, CacheNotFound, ConfigError
from .lazy import lazy
from .progress import Meter, live_default

torch = lazy("torch")
if TYPE_CHECKING:
    from .teachers import Teacher

console = Console(stderr=True, soft_wrap=True)  # log files: no line breaks mid-sentence


@dataclass
class ExtractConfig(ViewOptions):
    """Run a frozen teacher once over K augmented views per image and cache its patch features."""

    source: str = opt("", "Source: WebDataset tars (brace pattern, glob, comma list; local or fsspec URL) or an "
                          "image folder. Required, except with --views-of: then that cache's source (as it "
                          "recorded it).")
    teacher: str = opt("clip-b16", "Teacher: clip-b16, clip-l14, open_clip:ARCH[:PRETRAINED] (ARCH may be a config "
                                   ".json), timm:MODEL (a ViT, or a CNN: its last feature map's cells are the tokens).")
    teacher_args: dict = model_args_opt("--teacher-arg", "teacher (timm teachers; recorded in the fingerprint)")
    root: str = opt("./cache", "Cache root (local path or fsspec URL); the cache lands in <root>/<cache-id>/.",
                    old=("--cache",))
    codec: str = opt("int8", "Target codec: int8 (per-channel calibrated, per-token scale), int4 (half of int8's "
                             "bytes), pca:R (R components per token, e.g. pca:192) or fp16 (reference).")
    tap: str = opt("final", "Teacher feature: final (last block, before ln_post), ln_post, or proj (ln_post + CLIP "
                            "projection).")
    seed: int = opt(0, "Seed for view sampling (per image key, so independent of sharding and workers).", ge=0)
    teacher_weights: Optional[str] = opt(None, "Teacher weights file (.safetensors/.bin/.pt state dict), a path or "
                                               "fsspec URL.", old=("--weights",))
    teacher_seed: int = opt(0, "Init seed of a --random-init teacher (recorded in the fingerprint).", ge=0)
    random_init: bool = opt(False, "Use randomly initialised teacher weights (tests/demos only; recorded in the "
                                   "fingerprint).")
    shards: Optional[str] = opt(None, "Subset of source shards to compute: 'start:stop' or 'i,j,k' (the cache id is "
                                      "unchanged).")
    folder_shard_size: int = opt(1000, "Images per virtual shard when the source is an image folder.", ge=1)
    batch_size: int = opt(32, "Images per teacher batch (each contributes --views crops).", ge=1)
    workers: int = opt(2, "DataLoader worker processes decoding and cropping images.", ge=0)
    device: str = opt("auto", "Device: auto (CUDA if available, LOCAL_RANK under torchrun), cpu, cuda, cuda:N.")
    precision: str = precision_opt("Teacher precision")
    calib_images: int = opt(store.CALIB_IMAGES, "Images (the source's first) used to calibrate the int8, int4 and pca "
                                                "codecs (part of the cache's identity).", ge=1)
    fidelity_images: int = opt(8, "Images per shard whose targets are checked against the fp32 teacher for the "
                                  "fidelity report.", ge=0)
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE for the cache and source "
                                                "(repeatable), e.g. endpoint_url=...")
    claim_ttl: float = opt(600.0, "Seconds a shard claim lives without renewal; a dead extractor's shards are taken "
                                  "over after it.", gt=0)
    wait: bool = opt(True, "When other extractors hold claims on the remaining shards, wait for them (and take over "
                           "expired claims).")
    views_of: Optional[str] = opt(None, "A cache (URL) whose stored views this teacher sees: the same crops, flips and "
                                        "jitter, key by key and view by view, at this teacher's --image-size (a second "
                                        "teacher on the first one's views). Same --source; --views at most its K; its "
                                        "sampler options replace these.", group="Views")

    def recipe(self, image_size: int) -> views.ViewRecipe:
        return self.view_recipe(image_size, self.seed)


# ----------------------------------------------------------------------------- data

@dataclass
class Batch:
    """Up to batch_size images of one shard, in shard order, as a loader worker hands them over.
    The shard's last batch has last=True (and error= if the shard broke); skip= says the shard is not
    ours to compute ('committed', or the owner of a live claim)."""

    shard: str
    keys: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)   # undecodable samples: {key, error}
    images: torch.Tensor | list | None = None           # [n*K, 3, S, S] uint8 (normalized on the device), or with
    #                                                     --replay-on device the n decoded images [3, H, W] uint8,
    #                                                     with device-decode the n image files uint8 [bytes]
    views: np.ndarray | None = None                     # [n, K, len(VIEW_FIELDS)] int32
    labels: list[int] = field(default_factory=list)      # class labels of the source's samples, when it has them
    last: bool = True
    error: str | None = None
    skip: str | None = None
    claim_seconds: float = 0.0
    first_view: int = 0                                 # views before it are stored already (a growing shard)

    def pin_memory(self, device=None) -> "Batch":
        """The DataLoader's pin thread calls this (pin_memory=True): without it a dataclass passes through
        unpinned, and every copy to the GPU waits on pageable memory."""
        from torch.utils.data._utils.pin_memory import pin_memory

        self.images = pin_memory(self.images)  # a tensor, or a list of them; None passes through
        return self


def image_views(sample: sources.Sample, recipe: views.ViewRecipe, replay_on: str = "workers",
                first: int = 0, given: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Decode one sample and produce its K views: (uint8 images of views first..K-1 [K-first,3,S,S], params of
    all K [K,11]); `--replay-on device`: the decoded image [3,H,W] instead, for `replay_on_device`; device-decode:
    the image file [bytes] (its size read from the header). Views are drawn in sequence from a per-key
    generator, so the first views of a K'-view recipe are a K-view recipe's views.
    `given`: the params another cache stored for this key (--views-of), replayed instead of drawn."""
    image = views.decode_image(sample.data) if replay_on != "device-decode" else None
    h, w = (image.height, image.width) if image else views.image_size_of(sample.data)
    if given is None:
        params = views.sample_views(sample.key, h, w, recipe)
    elif (int(given[0, 5]), int(given[0, 6])) != (h, w):
        raise ValueError(f"the image is {h}x{w} px, the --views-of cache's views were drawn on "
                         f"{given[0, 5]}x{given[0, 6]} px (the source changed)")
    else:
        params = given
    if replay_on == "device-decode":
        return views.encoded_tensor(sample.data), params
    if replay_on == "device":
        return views.image_tensor(image), params
    return views.view_pixels(image, params[first:], recipe.image_size, recipe.replay), params


def replay_on_device(b: Batch, recipe: views.ViewRecipe, device: torch.device, decode: bool = False) -> torch.Tensor:
    """The views (first_view on) of a batch of decoded images, replayed on `device`: uint8 [n*(K-first),3,S,S].
    `decode`: the batch holds image files, decoded on `device` first; one that fails is skipped by name, as a
    loader worker skips an image it cannot decode."""
    if decode:
        failed: dict[int, str] = {}
        b.images = views.decode_batch(b.images, device, failed)
        b.skipped += [{"key": b.keys[i], "error": failed[i]} for i in sorted(failed)]
        for i in sorted(failed, reverse=True):
            del b.keys[i], b.images[i]
            b.views = np.delete(b.views, i, 0)
            if len(b.labels) > i:
                del b.labels[i]
        if not b.keys:
            return torch.empty(0, 3, recipe.image_size, recipe.image_size, dtype=torch.uint8, device=device)
    return views.replay_batch(b.images, [p[b.first_view:] for p in b.views], recipe.image_size, recipe.replay,
                              device)


def shard_batches(shard: sources.SourceShard, recipe: views.ViewRecipe, batch_size: int,
                  storage_options: dict | None = None, replay_on: str = "workers", first: int = 0,
                  stored: dict[str, np.ndarray] | None = None) -> Iterator[Batch]:
    """Batches of one shard, in order. The last one has last=True (and error= if the shard broke).
    `stored`: {key: params [K,11]} of the --views-of cache; a key it lacks is skipped, by name."""
    keys, imgs, params, skipped, labels = [], [], [], [], []

    def batch(last: bool, error: str | None = None) -> Batch:
        out = Batch(shard.name, keys=list(keys), skipped=list(skipped), labels=list(labels), last=last, error=error,
                    first_view=first)
        if keys:
            out.images, out.views = list(imgs) if replay_on != "workers" else torch.cat(imgs), np.stack(params)
        keys.clear(), imgs.clear(), params.clear(), skipped.clear(), labels.clear()
        return out

    try:
        for sample in sources.iter_samples(shard, storage_options):
            if sample.data is None:
                skipped.append({"key": sample.key, "error": "no image member (.jpg/.jpeg/.png/.webp)"})
                continue
            given = None if stored is None else stored.get(sample.key)
            if stored is not None and given is None:
                skipped.append({"key": sample.key, "error": "not in the --views-of cache (skipped there)"})
                continue
            try:
                x, p = image_views(sample, recipe, replay_on, first, given)
            except Exception as e:  # undecodable image: skip, count, list; never drop silently
                skipped.append({"key": sample.key, "error": f"{type(e).__name__}: {e}"})
                continue
            keys.append(sample.key), imgs.append(x), params.append(p)
            if sample.label is not None:
                labels.append(sample.label)
            if len(keys) == batch_size:
                yield batch(False)
    except sources.SourceError as e:
        yield batch(True, str(e))
        return
    yield batch(True)


def stored_views(cache: store.Cache, shard: str, k: int) -> dict[str, np.ndarray]:
    """{key: params of views 0..k-1 [k,11]} of one shard of the --views-of cache."""
    if shard not in cache.commits:
        raise sources.SourceError(f"the --views-of cache {cache.url} has no committed shard {shard}")
    per_view = [cache.read_encoded(shard, v, targets=False) for v in range(k)]
    keys = per_view[0][0]
    return {key: np.stack([p[i] for _, _, p in per_view]) for i, key in enumerate(keys)}


def _extract_stream_class() -> type:
    """ExtractStream subclasses torch's IterableDataset: made on first use (`mdcache.extract.ExtractStream`), so
    that importing this module (and the CLI) does not import torch."""
    class ExtractStream(torch.utils.data.IterableDataset):
        """Each DataLoader worker takes whole shards (i, i+W, ...), so a shard's batches stay ordered."""

        def __init__(self, shards, recipe, batch_size, storage_options=None, claims: Claims | None = None,
                     replay_on: str = "workers", grow: dict | None = None, views_of: tuple | None = None):
            self.shards, self.recipe, self.replay_on, self.grow = shards, recipe, replay_on, grow or {}
            self.views_of = views_of  # (url, storage options) of the cache whose views are replayed
            self.batch_size, self.storage_options, self.claims = batch_size, storage_options, claims

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid, nw = (info.id, info.num_workers) if info else (0, 1)
            base = store.open_cache(*self.views_of) if self.views_of else None  # once per worker, not per shard
            for shard in self.shards[wid::nw]:
                t0 = time.perf_counter()
                stem = store.stem_of(shard.name, self.recipe.views)  # done once this record exists
                why_not = self.claims.acquire(shard.name, stem) if self.claims else None
                claim_seconds = time.perf_counter() - t0
                if why_not:  # committed meanwhile, or another extractor is on it
                    yield Batch(shard.name, skip=why_not)
                    continue
                try:
                    stored = stored_views(base, shard.name, self.recipe.views) if base else None
                except (sources.SourceError, CacheError) as e:
                    yield Batch(shard.name, error=f"--views-of: {e}", claim_seconds=claim_seconds)
                    continue
                for b in shard_batches(shard, self.recipe, self.batch_size, self.storage_options, self.replay_on,
                                       self.grow.get(shard.name, 0), stored):
                    b.claim_seconds, claim_seconds = claim_seconds, 0.0  # reported once, with the first batch
                    yield b

    ExtractStream.__module__, ExtractStream.__qualname__ = __name__, "ExtractStream"  # picklable by name
    return ExtractStream


def _stream_cls() -> type:
    if "ExtractStream" not in globals():
        globals()["ExtractStream"] = _extract_stream_class()
    return globals()["ExtractStream"]


def __getattr__(name: str):
    if name == "ExtractStream":
        return _stream_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- setup

@dataclass
class Prepared:
    """Everything an extraction needs before it touches a cache: shared by `extract` and `mdcache bench`."""

    storage_options: dict
    shards: list[sources.SourceShard]  # all source shards (the fingerprint's), before --shards and ranks
    device: torch.device
    precision: str
    teacher: Teacher
    recipe: views.ViewRecipe
    views_of: store.Cache | None = None  # the cache whose stored views are replayed (--views-of)

    @property
    def views_of_ref(self) -> tuple[str, dict] | None:
        """What loader workers need to open the --views-of cache (no open cache crosses into them)."""
        return (self.views_of.url, self.views_of.storage_options) if self.views_of else None


def with_source(cfg: ExtractConfig) -> ExtractConfig:
    """--views-of without --source: the images are the --views-of cache's, where its manifest says they are."""
    if cfg.source:
        return cfg
    if not cfg.views_of:
        raise ConfigError("--source is required: the images to extract (or --views-of CACHE: that cache's images)")
    return replace(cfg, source=store.open_cache(cfg.views_of, cfg.storage_options).manifest["source"]["spec"])


def prepare(cfg: ExtractConfig) -> Prepared:
    """Check the options, list the source, and load the teacher (weights fetched from any URL first)."""
    from .teachers import load_teacher

    cfg = with_source(cfg)
    check_options(cfg)
    so = cfg.storage_options
    codecs.get_codec(cfg.codec)
    shards = sources.list_source(cfg.source, so, cfg.folder_shard_size)
    device = use_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    teacher = load_teacher(cfg.teacher, weights=mfs.fetch(cfg.teacher_weights, so) if cfg.teacher_weights else None,
                           random_init=cfg.random_init, tap=cfg.tap, image_size=cfg.image_size, device=device,
                           seed=cfg.teacher_seed, model_args=cfg.teacher_args)
    if cfg.random_init:
        console.print("[yellow]warning:[/] teacher uses RANDOM weights (--random-init): targets are for tests/demos "
                      "only")
    codecs.get_codec(cfg.codec).shapes(teacher.num_patches, teacher.dim)  # refused now, not after calibrating
    base = open_views_of(cfg, shards) if cfg.views_of else None
    recipe = recipe_of(base, teacher.image_size, cfg.views) if base else cfg.recipe(teacher.image_size)
    if cfg.replay_on == "device-decode" and device.type == "cuda":  # nvJPEG's pixels: a recipe of their own
        recipe = replace(recipe, decoder=views.DECODER_NVJPEG)
    return Prepared(so, shards, device, precision, teacher, recipe, base)


def open_views_of(cfg: ExtractConfig, shards: list[sources.SourceShard]) -> store.Cache:
    """The --views-of cache, checked: complete, made from this source, with at least --views views."""
    base = store.open_cache(cfg.views_of, cfg.storage_options)
    if not base.complete:
        raise ConfigError(f"--views-of {cfg.views_of}: the cache is incomplete ({len(base.commits)}/"
                          f"{len(base.source_shards)} shards); finish it first (its extract command resumes)")
    if base.manifest["fingerprint"]["source"] != sources.identity(shards):
        raise ConfigError(f"--views-of {cfg.views_of}: the cache was made from another source "
                          f"({base.manifest['source']['spec']}) than --source {cfg.source}")
    if cfg.views > base.views:
        raise ConfigError(f"--views {cfg.views}: the --views-of cache {cfg.views_of} stores {base.views_text()} views "
                          f"per image; grow it first (mdcache extract ... --views {cfg.views} against it)")
    return base


def recipe_of(base: store.Cache, image_size: int, k: int) -> views.ViewRecipe:
    """The view recipe of a cache, at another teacher's input size: its stored views replay at any size."""
    v = base.manifest["fingerprint"]["views"]
    return views.ViewRecipe(image_size=image_size, scale=tuple(v["scale"]), ratio=tuple(v["ratio"]), flip=v["flip"],
                            views=k, seed=v["seed"], color_jitter=v.get("color_jitter", 0.0),
                            replay=v.get("replay", views.REPLAY_PIL))


def calibrate(cfg: ExtractConfig, p: Prepared) -> dict | None:
    """Codec calibration from the first usable images of the source, in shard order: deterministic, so
    every extractor of this cache (resumed, concurrent, other ranks) derives the same numbers. An
    unreadable shard is passed over (it fails again, by name, when its turn comes)."""
    from .teachers import run_teacher

    # the first CALIB_VIEWS views of each image, whatever K: growing K keeps the calibration (views are nested, so
    # a K=1 cache calibrates on views it would store at K=2; --views-of: the ones the other cache stores)
    recipe = replace(p.recipe, views=min(store.CALIB_VIEWS, p.views_of.views) if p.views_of else store.CALIB_VIEWS)

    def batches() -> Iterator[tuple[int, torch.Tensor]]:
        for shard in p.shards:
            try:
                stored = stored_views(p.views_of, shard.name, recipe.views) if p.views_of else None
                for b in shard_batches(shard, recipe, min(cfg.batch_size, cfg.calib_images), p.storage_options,
                                       stored=stored):
                    if b.error:
                        raise sources.SourceError(b.error)
                    if b.keys:
                        yield len(b.keys), run_teacher(p.teacher, b.images, p.precision)
            except sources.SourceError as e:
                console.print(f"[yellow]warning:[/] calibration passed over unreadable shard {shard.name} ({e})")

    return codecs.calibrate_on(cfg.codec, batches(), cfg.calib_images, lambda: sources.SourceError(
        f"no decodable image in {len(p.shards)} source shard(s) to calibrate the {cfg.codec} codec on (first: "
        f"{p.shards[0].url})"))


def open_or_create(cfg: ExtractConfig, p: Prepared) -> store.Cache:
    drew = store.views_root(p.views_of.manifest) if p.views_of else None  # a chain's root
    fp = store.fingerprint(p.teacher, p.recipe, p.shards, cfg.codec, p.precision, cfg.calib_images, views_of=drew)
    url = mfs.join(cfg.root, store.cache_id(fp))

    def manifest() -> dict:
        calibration = store.put_calibration(url, calibrate(cfg, p), p.storage_options)
        return store.new_manifest(fp, p.teacher, p.recipe, cfg.source, p.shards, calibration)

    calibrating = f" (calibrating {cfg.codec} codec)" if codecs.get_codec(cfg.codec).calibrate else ""
    return open_or_create_cache(url, fp, p.storage_options, manifest, calibrating)


def open_or_create_cache(url: str, fp: dict, so: dict, make_manifest: Callable[[], dict],
                         note: str = "") -> store.Cache:
    """The cache `fp` names: opened when it exists (its fingerprint must be this one), else created with
    `make_manifest()` (calibration included; the first creator's manifest wins). Shared by extract and
    transcode."""
    try:
        cache = store.open_cache(url, so)
        if cache.manifest["fingerprint"] != fp:
            raise CacheError(f"{url}: manifest fingerprint differs from this run's (id collision or tampering)")
        return cache
    except CacheNotFound:
        pass
    check_writable(url, so)
    console.print(f"[bold]new cache[/] {url}{note}")
    for old, differ in older_relatives(url, fp, so):
        why = (f"cache ids changed since (format {store.FORMAT_VERSION}), so these settings name this new cache"
               if not differ else f"its view settings differ ({', '.join(differ)})")
        console.print(f"note: {old} beside it was made by an earlier mdcache from the same teacher weights, source "
                      f"and codec; {why}. The old one stays readable (`mdtrain pretrain --cache` it) but cannot "
                      "grow; `mdcache rm` it when it is no longer needed.")
    store.create_manifest(url, make_manifest(), so)
    return store.open_cache(url, so)


def older_relatives(url: str, fp: dict, so: dict) -> list[tuple[str, list[str]]]:
    """Caches beside `url` that an earlier cache format made from the same teacher weights, source and codec
    (an upgrade would otherwise extract them again without a word): ('ID (format F, K views)', the view
    settings that differ, K apart) each."""
    def same(old: dict) -> bool:
        teacher = all(old.get("teacher", {}).get(k) == fp["teacher"].get(k)
                      for k in ("arch", "weights_sha256", "tap", "image_size"))
        return teacher and old.get("source") == fp.get("source") and old.get("codec") == fp.get("codec")

    def differ(old: dict) -> list[str]:
        a, b = old.get("views", {}), fp.get("views", {})
        return sorted(k for k in set(a) | set(b) if k != "views" and a.get(k) != b.get(k))

    root, out = url.rsplit("/", 1)[0], []
    try:
        fs, path = mfs.url_to_fs(root, so)
        entries = fs.ls(path, detail=False) if fs.exists(path) else []
    except (OSError, CacheError):
        return []
    for entry in entries:
        try:
            m = mfs.read_json(fs, mfs.join(entry, store.MANIFEST))
        except (OSError, CacheError, ValueError):
            continue
        old = m.get("fingerprint", {})
        if int(m.get("format_version", 1)) < store.FORMAT_VERSION and same(old):
            out.append((f"{root}/{m.get('cache_id')} (format {m.get('format_version', 1)}, {m.get('views')} views)",
                        differ(old)))
    return out


def check_writable(cache_url: str, so: dict) -> None:
    """Fail early, with a clear message, when the credentials cannot write to the cache."""
    fs, path = mfs.url_to_fs(cache_url, so)
    probe = mfs.join(path, store.CLAIMS, f".write-probe-{new_owner().replace(':', '-').replace('@', '-')}")
    try:
        mfs.write_json(fs, probe, {})
        fs.rm(probe)
    except PermissionError as e:
        raise CacheError(f"no write access to {cache_url} ({e}); these credentials can list, verify and "
                         "train from the cache, but extracting needs write permission") from None


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ----------------------------------------------------------------------------- writing

class ShardBuffer:
    """Encoded targets of one shard, accumulated batch by batch until its last batch arrives."""

    def __init__(self, first: int = 0) -> None:
        self.first = first  # views already stored (a growing shard): these batches hold the ones after
        self.keys: list[str] = []
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.views: list[np.ndarray] = []
        self.skipped: list[dict] = []
        self.labels: list[int] = []
        self.meter = codecs.FidelityMeter()
        self.started = time.time()
        self.overhead = 0.0  # coordination cost: claim + commit record + release

    def add(self, b: Batch, encoded: dict[str, np.ndarray], k: int) -> None:
        n = len(b.keys)
        self.keys += b.keys
        self.views.append(b.views)
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


LABEL_MIXING_WARN = 0.6


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def label_mixing(shards: dict[str, list[int]]) -> dict[str, float]:
    """Per shard: its label entropy over the entropy of all these shards' labels together (capped by what its
    sample count allows). About 1 for shuffled shards; near 0 when each shard holds one or two classes, so that
    every training batch (cut from one shard through a shuffle buffer) would too."""
    width = max((len(c) for c in shards.values()), default=0)
    counts = {name: np.pad(np.asarray(c, np.float64), (0, width - len(c))) for name, c in shards.items()}
    total = sum(counts.values(), np.zeros(width))
    out = {}
    for name, c in counts.items():
        best = min(entropy(total), np.log(c.sum()))
        if best > 0:
            out[name] = entropy(c) / best
    return out


def warn_unmixed(summary: dict) -> None:
    """Shards whose labels are badly mixed: say so, with the fix (shuffle before sharding)."""
    mix = label_mixing(summary["labels"])
    bad = {n: round(m, 3) for n, m in sorted(mix.items()) if m < LABEL_MIXING_WARN}
    summary["unmixed"] = bad
    if bad:
        names = ", ".join(list(bad)[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        console.print(f"[yellow]warning:[/] {len(bad)} of {len(mix)} shard(s) hold few of the source's classes "
                      f"(label entropy below {LABEL_MIXING_WARN:.0%} of the whole source's: {names}). Training "
                      "batches are cut from one shard at a time, so each would see one or two classes: shuffle "
                      "the samples across shards before extracting (docs/quickstart.md).")


def new_summary(cache_url: str, reused: int) -> dict:
    return {"cache": cache_url, "reused": reused, "committed": [], "lost_race": [], "failed": {}, "skipped": 0,
            "images": 0, "seconds": 0.0, "wait_seconds": 0.0, "elsewhere": {}, "overhead_seconds": 0.0,
            "shard_seconds": 0.0, "labels": {}, "unmixed": {}}


class ShardWriter:
    """A shard's life after the teacher. A host thread encodes each batch on the teacher's device, copies it
    to the host and measures its fidelity while the main thread feeds the teacher the next batch (at most
    HOST_DEPTH batches wait, their features on the device). At a shard's last batch a writer thread writes
    its Zarr group, publishes the commit record and releases the claim (at most one more shard in flight,
    so memory stays bounded), then accounts for it in `summary` and logs one line."""

    HOST_DEPTH = 2

    def __init__(self, cache: store.Cache, k: int, claims: Claims | None,
                 todo: list[sources.SourceShard], summary: dict, fidelity_images: int, log: bool,
                 advance: Callable[[], None] = lambda: None):
        self.cache, self.k, self.claims, self.summary, self.log, self.advance = cache, k, claims, summary, log, advance
        self.codec = codecs.get_codec(cache.codec)
        self.shapes = self.codec.shapes(int(cache.manifest["teacher"]["tokens"]), cache.teacher_dim)
        self.by_name = {s.name: s for s in todo}
        self.fidelity_images = fidelity_images
        self.buffers: dict[str, ShardBuffer] = {}
        self.pending: list[Future] = []
        self.hosting: list[Future] = []
        self.checked: set[str] = set()  # shards whose fidelity reference was asked for (main thread)
        self.host = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdcache-host")
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdcache-writer")

    def fidelity_views(self, b: Batch) -> int:
        """How many of this batch's views to check against the fp32 teacher: the shard's first images only."""
        if b.shard in self.checked:
            return 0
        self.checked.add(b.shard)
        return min(len(b.keys), self.fidelity_images) * (self.k - b.first_view)

    def add(self, b: Batch, feats: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> None:
        """One batch's teacher features [n*K, P, D] (None for a batch without images); `reference` are fp32
        features of its first views, for the fidelity report. Returns at once unless HOST_DEPTH batches wait."""
        self.hosting.append(self.host.submit(self._absorb, b, feats, reference))
        while len(self.hosting) > self.HOST_DEPTH or (self.hosting and self.hosting[0].done()):
            self.hosting.pop(0).result()  # surfaces the host thread's errors here

    def _absorb(self, b: Batch, feats: torch.Tensor | None, reference: torch.Tensor | None) -> None:
        """Host thread: encode (on the features' device), to the host, fidelity; a shard's last batch goes on."""
        buf = self.buffers.setdefault(b.shard, ShardBuffer(b.first_view))
        buf.overhead += b.claim_seconds
        buf.skipped += b.skipped
        buf.labels += b.labels
        if feats is not None:
            encoded = self.codec.encode(feats, self.cache.calibration_on(feats.device))
            if reference is not None:
                m = len(reference)
                buf.meter.update(reference.cpu(), self.codec.decode(
                    {a: torch.from_numpy(v[:m]) for a, v in encoded.items()}, self.cache.calibration_on("cpu")))
            buf.add(b, encoded, self.k - buf.first)
        if b.last:
            self.finish(b)

    def finish(self, b: Batch) -> None:
        buf = self.buffers.pop(b.shard)
        self.summary["skipped"] += len(buf.skipped)
        if buf.labels:
            self.summary["labels"][b.shard] = np.bincount(np.asarray(buf.labels)).tolist()
        if b.error:
            self.summary["failed"][b.shard] = b.error
            if self.claims:
                self.claims.release(b.shard)
            console.print(f"[red]shard failed:[/] {b.error}")
            self.advance()
            return
        self.pending.append(self.pool.submit(self._commit, b.shard, buf))
        self.drain(keep=1)

    def _commit(self, name: str, buf: ShardBuffer) -> tuple[str, ShardBuffer, bool, dict]:
        """Writer thread: data first, then the create-if-absent commit record, then the claim goes."""
        arrays, views_ = buf.stacked(self.k - buf.first, self.shapes)
        extra = {"fidelity": buf.meter.report(), "skipped": buf.skipped, "seconds": round(time.time() - buf.started, 3),
                 "source": self.by_name[name].to_json(), "rank": rank_world()[0],
                 "extractor": self.claims.owner if self.claims else mfs.who(),
                 "calibration_sha256": self.cache.manifest["codec"]["calibration_sha256"]}
        if buf.first:  # a growing shard: the stored views first, exactly as they are, then the new ones
            try:
                arrays, views_ = self.grown(name, buf, arrays, views_, extra)
            except CacheError as e:  # this shard cannot grow: named, nothing written, the others go on
                if self.claims:
                    self.claims.release(name)
                return name, buf, False, {**extra, "error": str(e)}
        so = self.cache.storage_options
        rec = store.write_shard_data(self.cache.url, name, buf.keys, arrays, views_, extra, so)
        t0 = time.perf_counter()
        won = store.publish(self.cache.url, rec, so)
        if self.claims:
            self.claims.release(name)
        buf.overhead += time.perf_counter() - t0
        return name, buf, won, extra

    def grown(self, name: str, buf: ShardBuffer, new: dict[str, np.ndarray], params: np.ndarray,
              extra: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """All K views of a growing shard: its stored views 0..first-1 read back (checksums checked) before the
        new ones. The sampler's parameters for the stored views must be the stored ones, key by key."""
        rec = self.cache.commits[name]
        old = [self.cache.read_encoded(name, v) for v in range(buf.first)]
        if old and old[0][0] != buf.keys:
            raise CacheError(f"{self.cache.url}: shard {name}: the source's keys are not the stored shard's (the "
                             "source changed since its first views were extracted)")
        stored = np.stack([p for _, _, p in old])
        if not np.array_equal(stored, params[:buf.first]):
            raise CacheError(f"{self.cache.url}: shard {name}: the view parameters drawn now differ from the stored "
                             "ones (another sampler?): a cache can only grow by views drawn in the same sequence")
        meter = codecs.FidelityMeter()
        meter.merge(rec.get("fidelity", {}))
        meter.merge(extra["fidelity"])
        extra.update(fidelity=meter.report(), grows=rec["path"])
        arrays = {a: np.concatenate([np.stack([arr[a] for _, arr, _ in old]), new[a]]) for a in new}
        return arrays, params

    def _done(self, name: str, buf: ShardBuffer, won: bool, extra: dict) -> None:
        self.summary["overhead_seconds"] += buf.overhead
        self.summary["shard_seconds"] += time.time() - buf.started
        if "error" in extra:
            self.summary["failed"][name] = extra["error"]
            console.print(f"[red]shard failed:[/] {extra['error']}")
            self.advance()
            return
        (self.summary["committed"] if won else self.summary["lost_race"]).append(name)
        if self.log:  # logs (no live bar): one line per shard
            grown = f" (grown from {buf.first} to {self.k} views)" if buf.first else ""
            console.print(f"shard {name}: {'committed' if won else 'already committed by another extractor'}{grown}, "
                          f"{len(buf.keys)} images, {len(buf.skipped)} skipped, {extra['seconds']:.1f}s")
        self.advance()

    def drain(self, keep: int) -> None:
        """Bound memory: wait until at most `keep` shard writes are in flight (and surface their errors)."""
        while len(self.pending) > keep:
            self._done(*self.pending.pop(0).result())
        while self.pending and self.pending[0].done():
            self._done(*self.pending.pop(0).result())

    def close(self) -> None:
        try:
            for f in self.hosting:
                f.result()
            self.drain(keep=0)
        finally:
            self.host.shutdown()
            self.pool.shutdown()


# ----------------------------------------------------------------------------- the loop

def poll_delays(ttl: float) -> Iterator[float]:
    """Seconds between looks at other extractors' claims: one second first (short shards finish, dead
    owners on this host are taken over at once), then 1.5x longer each idle look, up to ttl/4 or 30 s.
    A look costs a listing and a GET per record committed since the last one, not a re-read of all."""
    delay, cap = 1.0, max(1.0, min(ttl / 4, 30.0))
    while True:
        yield min(delay, cap)
        delay *= 1.5


def run_claimed(cache: store.Cache, todo: list, summary: dict, one_pass: Callable[[list, Claims], None],
                claim_ttl: float, wait: bool, k: int) -> None:
    """Compute `todo` (items with a .name: source shards) into `cache` together with any other process doing
    the same: claim, compute, commit; then wait for (or take over) what others hold, until all is committed
    or failed. `one_pass(todo, claims)` does one pass, recording into `summary`. Shared by extract and
    transcode: the same claims, commits and resume for both."""
    check_writable(cache.url, cache.storage_options)
    claims = Claims(cache.url, new_owner(), claim_ttl, cache.storage_options)
    renewer = Renewer(claims)
    renewer.start()
    delays = poll_delays(claim_ttl)
    try:
        while todo:
            summary["elsewhere"] = {}
            one_pass(todo, claims)
            cache.refresh()
            done = {n for n, rec in cache.commits.items() if int(rec["views"]) >= k}  # a shard still growing is not
            for name in set(claims.mine()) - done - set(summary["failed"]):
                claims.release(name)  # never wait on a claim of our own: that would wait forever
                summary["failed"][name] = "claimed by this job but neither committed nor failed; released"
            before = len(todo)
            todo = [s for s in todo if cache.commits.get(s.name, {}).get("views", 0) < k
                    and s.name not in summary["failed"]]
            if not todo or not wait:
                break
            if len(todo) < before:  # others are committing: look again soon
                delays = poll_delays(claim_ttl)
            owners = sorted(set(summary["elsewhere"].values()))
            console.print(f"waiting for {len(todo)} shard(s) claimed by {', '.join(owners) or 'others'} "
                          f"(taken over if their claims expire; --no-wait to stop instead)")
            time.sleep(next(delays))
    finally:
        renewer.stop()
    if cache.refresh().index_stale:
        cache.write_index()


def resume(cache: store.Cache, selected: list, k: int) -> tuple[list, dict]:
    """What is left to compute of `selected` for K views (committed shards with K or more are reused; one with
    fewer grows: summary["grow"] says how many it has), and a fresh summary. Decided from the commit records
    themselves, never from the index alone (a wrong index is rewritten). A committed shard whose data was
    deleted has its commit withdrawn, so it is computed again."""
    cache.refresh(records=True)
    if cache.index_problems:
        console.print(f"[yellow]warning:[/] {cache.url}/{store.COMMIT_INDEX} disagrees with the commit records "
                      f"({cache.index_problems[0]}{' ...' if len(cache.index_problems) > 1 else ''}): rewriting it")
    for _ in range(len(cache.records) + 1):  # a grown shard may have lost the data of several records: each goes
        broken = sorted(set(cache.missing_data()) & {s.name for s in selected})
        if not broken:  # a committed shard whose data was deleted must not be "reused" forever
            break
        check_writable(cache.url, cache.storage_options)
        for name in broken:
            console.print(f"[yellow]warning:[/] shard {name} is committed but its data "
                          f"{cache.commits[name]['path']} is missing: withdrawing its commit and computing it again")
            rec = cache.commits[name]
            store.drop_commit(cache.url, store.record_stem(rec), rec["path"], cache.storage_options)
        cache.refresh()
    have = {s.name: int(cache.commits[s.name]["views"]) for s in selected if s.name in cache.commits}
    todo = [s for s in selected if have.get(s.name, 0) < k]
    grow = {s.name: have[s.name] for s in todo if s.name in have}
    if grow and cache.format_version < 2:
        raise CacheError(f"{cache.url}: a format-{cache.format_version} cache cannot grow to {k} views (its K is part "
                         "of its identity); extract a new one")
    reused = len(selected) - len(todo)
    if reused or grow:
        console.print(f"reusing {reused} committed shard(s) of {len(selected)} selected; " +
                      (f"growing {len(grow)} to {k} views; computing {len(todo) - len(grow)} more"
                       if grow else f"computing {len(todo)}"))
    summary = new_summary(cache.url, reused)
    summary["grow"] = grow
    return todo, summary


def extract(cfg: ExtractConfig, progress: bool = True, prepared: Prepared | None = None) -> tuple[str, dict]:
    """Run an extraction; returns (cache URL, summary). Raises on setup errors, reports shard errors."""
    cfg = with_source(cfg)
    p = prepared or prepare(cfg)
    rank, world = rank_world()
    selected = sources.select(p.shards, cfg.shards)[rank::world]  # a bad --shards is refused before a cache exists
    cache = open_or_create(cfg, p)
    todo, summary = resume(cache, selected, p.recipe.views)
    if not todo:
        if cache.index_stale:  # records read one by one (or a damaged index): compact them for the next reader
            cache.write_index()
        return cache.url, summary
    run_claimed(cache, todo, summary, lambda todo, claims: run_pass(cfg, p, cache, todo, summary, progress, claims),
                cfg.claim_ttl, cfg.wait, p.recipe.views)
    warn_unmixed(summary)
    return cache.url, summary


def run_pass(cfg: ExtractConfig, p: Prepared, cache: store.Cache, todo: list[sources.SourceShard], summary: dict,
             progress: bool, claims: Claims | None) -> None:
    """One pass over the shards still to do: workers decode and crop, the teacher runs here, the writer commits."""
    from .teachers import run_teacher

    teacher, k = p.teacher, p.recipe.views
    loader = torch.utils.data.DataLoader(
        _stream_cls()(todo, p.recipe, cfg.batch_size, p.storage_options, claims,
                      replay_on=views.check_replay_on(cfg.replay_on, p.recipe.replay), grow=summary["grow"],
                      views_of=p.views_of_ref),
        batch_size=None, num_workers=min(cfg.workers, len(todo)), persistent_workers=False,
        prefetch_factor=4 if cfg.workers else None, pin_memory=p.device.type == "cuda")
    with shard_pass("extract", cache, k, claims, todo, summary, cfg.fidelity_images, progress) as (meter, writer):
        for b in meter.data(loader):
            if b.skip:
                if b.skip != "committed":
                    summary["elsewhere"][b.shard] = b.skip
                meter.advance()
                continue
            feats = ref = None
            if b.keys and isinstance(b.images, list):  # --replay-on device or device-decode
                b.images = replay_on_device(b, p.recipe, p.device, decode=cfg.replay_on == "device-decode")
            if b.keys:
                feats = run_teacher(teacher, b.images, p.precision)
                m = writer.fidelity_views(b)
                if m:
                    ref = feats[:m] if p.precision == "fp32" else run_teacher(teacher, b.images[:m], "fp32")
                meter.count(len(b.keys))
            writer.add(b, feats, ref)
            meter.report()


@contextmanager
def shard_pass(what: str, cache: store.Cache, k: int, claims: Claims | None, todo: list[sources.SourceShard],
               summary: dict, fidelity_images: int, progress: bool) -> Iterator[tuple[Meter, ShardWriter]]:
    """One pass of a shard job (extract, transcode): its progress meter and the writer that commits; the pass's
    images, seconds and input wait go into the run's summary (a run may take several passes)."""
    meter = Meter(what, "shards", len(todo), live=progress, quiet=True, cumulative=True, console=console)
    with meter:
        writer = ShardWriter(cache, k, claims, todo, summary, fidelity_images, log=not progress, advance=meter.advance)
        try:
            yield meter, writer
        finally:
            writer.close()
    summary["images"] += meter.items_total
    summary["seconds"] += time.perf_counter() - meter.started
    summary["wait_seconds"] += meter.waited_total


def report(url: str, summary: dict, who: str, details: str = "") -> None:
    """The end of an extract or transcode run: what was done, what failed, what others hold; the URL last."""
    secs = max(summary["seconds"], 1e-9)
    rate = (f" in {summary['seconds']:.0f}s ({summary['images'] / secs:.1f} img/s, waiting for the input "
            f"{summary['wait_seconds'] / secs:.0%} of it)" if summary["images"] else "")
    console.print(f"committed {len(summary['committed'])} shard(s), {summary['images']} images{rate}, reused "
                  f"{summary['reused']}{details}" +
                  (f", {len(summary['lost_race'])} shard(s) committed by another {who} first"
                   if summary["lost_race"] else ""))
    for name, err in summary["failed"].items():
        console.print(f"[red]FAILED[/] shard {name}: {err}")
    if summary["elsewhere"]:
        console.print(f"{len(summary['elsewhere'])} shard(s) left to other {who}s holding claims: "
                      + ", ".join(f"{n} ({o})" for n, o in sorted(summary["elsewhere"].items())))
    print(url)
    if summary["failed"]:
        raise SystemExit(1)


def run_cli(cfg: ExtractConfig) -> None:
    url, summary = extract(cfg, progress=live_default())
    report(url, summary, "extractor", f", skipped {summary['skipped']} undecodable sample(s)")
