"""The pretraining stream: each source shard read in lockstep with its cache shard.

Order, all derived from `--seed` (never from worker timing):

    epoch e:  shards permuted by (seed, e)  ->  rank r takes shards[r::world]
              -> lane l (one per loader worker) takes those [l::lanes]
              -> within a shard: a shuffle buffer seeded by (seed, e, shard)
              -> each lane cuts its own stream into batches (the last partial batch is dropped)
              -> the loader interleaves lanes round-robin (what torch's DataLoader does with
                 worker-side batches; with 0 workers we interleave ourselves).

Every image uses one of its K stored views per epoch, the same view for the whole shard (one
sequential cache read), with the K views of each block of K epochs a permutation: all views get used.
Masks are a pure function of (seed, epoch, key). Because everything is a function of counts that
the cache's commit records already hold, a lane can skip to any batch without decoding a pixel:
that is the exact mid-epoch resume. Pixels leave the workers as uint8 (4x less traffic than float)
and are normalized on the device; targets leave still encoded (int8 + scales, or fp16) and are
dequantized on the device ("decode late").
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch

from mdcache import store, views
from mdcache.errors import UserError
from mdcache.sources import Sample, SourceShard, iter_samples, list_source

from .masking import BlockMasker
from .runtime import shuffled

# The student sees ImageNet normalization (timm's defaults); the teacher its own (from the manifest).
STUDENT_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN/STD (a test checks); not imported here:
STUDENT_STD = (0.229, 0.224, 0.225)    # timm costs 3 s at start-up, and every command pays it


class DataError(UserError):
    """Source and cache disagree, or the data cannot feed the requested run. Names the shard."""


@dataclass(frozen=True)
class ShardPlan:
    """One shard as the stream needs it: where the images are and how many samples it yields."""

    name: str
    source: SourceShard
    samples: int
    skipped: tuple[str, ...] = ()   # keys the extractor skipped (undecodable): not in the cache


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int
    image_size: int
    grid: tuple[int, int]
    views: int
    seed: int = 0
    mask_ratio: float = 75 / 196
    min_mask_patches: int | None = None     # None: 16 patches scaled to the grid size
    shuffle_buffer: int = 256
    rank: int = 0
    world: int = 1
    lanes: int = 1                          # = max(1, loader workers); fixed for exact resume
    with_targets: bool = True
    fresh_crops: bool = False               # online without a cache: a new crop per (epoch, key), not K replayed
    replay: str = views.REPLAY_IMPL         # the cache's view replay (online: the recipe's)
    replay_on: str = "workers"              # device: workers ship decoded images, the step replays them on its
    #                                         device; device-decode: workers ship the files, the device decodes too
    storage_options: dict | None = field(default=None, hash=False)


# ----------------------------------------------------------------------------- planning

def plan_from_cache(cache: store.Cache, source: str | None = None) -> list[ShardPlan]:
    """Shards of a complete cache, with their source shards (from the manifest, or `--source`)."""
    if not cache.complete:
        missing = [s["name"] for s in cache.source_shards if s["name"] not in cache.commits]
        raise DataError(f"cache {cache.url} is incomplete: {len(cache.commits)}/{len(cache.source_shards)} shards "
                        f"committed; missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. "
                        "Finish it with the same `mdcache extract` command (it resumes).")
    by_name = {s.name: s for s in cache.sources()}
    if source:
        first = next(iter(by_name.values()))
        # An image folder is cut into shards of a fixed size at extraction: cut the copy the same way.
        given = {s.name: s for s in list_source(source, cache.storage_options,
                                                folder_shard_size=len(first.files) or 1000)}
        missing = [n for n in by_name if n not in given]
        if missing:
            raise DataError(f"--source {source!r} lacks shard(s) the cache was made from: {', '.join(missing[:5])}")
        other = [f"{n} ({given[n].size} bytes, {by_name[n].size} at extraction)" for n in by_name
                 if by_name[n].size and given[n].size != by_name[n].size]
        if other:
            raise DataError(f"--source {source!r}: shard(s) differ in size from the ones the cache was made from: "
                            f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}; they are other data")
        by_name = {n: given[n] for n in by_name}
    return [ShardPlan(name=n, source=by_name[n], samples=int(cache.commits[n]["samples"]),
                      skipped=tuple(s["key"] for s in cache.commits[n].get("skipped", [])))
            for n in cache.shard_names]


def plan_from_source(source: str, storage_options: dict | None = None) -> list[ShardPlan]:
    """Online mode without a cache: count each shard's image samples once (bytes read, nothing decoded)."""
    return [ShardPlan(name=s.name, source=s, samples=sum(x.data is not None for x in iter_samples(s, storage_options)))
            for s in list_source(source, storage_options)]


def shard_order(shards: list[ShardPlan], seed: int, epoch: int) -> list[ShardPlan]:
    perm = views.key_rng(seed, f"shards/{epoch}").permutation(len(shards))
    return [shards[i] for i in perm]


def lane_shards(shards: list[ShardPlan], cfg: StreamConfig, epoch: int) -> list[list[ShardPlan]]:
    """This rank's shards for the epoch, split into lanes (disjoint across ranks and lanes)."""
    mine = shard_order(shards, cfg.seed, epoch)[cfg.rank::cfg.world]
    return [mine[lane::cfg.lanes] for lane in range(cfg.lanes)]


def lane_batch_counts(shards: list[ShardPlan], cfg: StreamConfig, epoch: int, rank: int | None = None) -> list[int]:
    c = cfg if rank is None else replace(cfg, rank=rank)
    return [sum(s.samples for s in lane) // cfg.batch_size for lane in lane_shards(shards, c, epoch)]


def steps_per_epoch(shards: list[ShardPlan], cfg: StreamConfig, epochs: int) -> int:
    """Batches every rank takes per epoch: the minimum over ranks and epochs (DDP ranks must agree)."""
    n = min(sum(lane_batch_counts(shards, cfg, e, r)) for e in range(max(1, epochs)) for r in range(cfg.world))
    if n == 0:
        total = sum(s.samples for s in shards)
        raise DataError(f"{total} samples in {len(shards)} shard(s) give some rank/worker no full batch of "
                        f"{cfg.batch_size} (world {cfg.world}, {cfg.lanes} lane(s)): lower --batch-size or --workers")
    return n


def resume_layout(counts: list[int], consumed: int) -> tuple[list[int], int]:
    """Round-robin over lanes (skipping exhausted ones), `consumed` batches in: (batches each lane has
    delivered, lane the next batch comes from). Restarting the loader with lanes rotated to start at
    that lane continues the exact same sequence."""
    taken, i, n = [0] * len(counts), 0, 0
    if consumed > sum(counts):
        raise DataError(f"resume position {consumed} is past the epoch's {sum(counts)} batches")
    while n < consumed:
        lane = i % len(counts)
        if taken[lane] < counts[lane]:
            taken[lane] += 1
            n += 1
        i += 1
    return taken, i % len(counts)


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's batches for one epoch, starting after `skip` batches (mid-epoch resume).

    Batch: images uint8 [B,3,S,S], mask bool [B,P], targets {array: encoded [B,...]} (if a cache and
    with_targets; the arrays of `extra` cache j as "t{j}/array"), keys, shards, views (view index per sample).
    `extra`: caches of other teachers on the same views (multi-teacher), read in lockstep and checked key by
    key and view by view against `cache`.
    """

    def __init__(self, shards: list[ShardPlan], cfg: StreamConfig, epoch: int, skip: int = 0,
                 cache: store.Cache | None = None, recipe: views.ViewRecipe | None = None,
                 extra: tuple[store.Cache, ...] = ()):
        if cache is None and recipe is None:
            raise ValueError("a stream needs a cache (stored views) or a view recipe (online mode)")
        if cache is not None and not 1 <= cfg.views <= cache.views:
            raise ValueError(f"{cache.url} stores {cache.views} views per image, asked to train on {cfg.views}")
        if cfg.fresh_crops and recipe is not None:  # one view per image and epoch, from its own seed
            recipe = replace(recipe, views=1, seed=int(views.key_rng(recipe.seed, f"fresh/{epoch}").integers(2**31)))
        self.shards, self.cfg, self.epoch, self.cache, self.recipe = shards, cfg, epoch, cache, recipe
        self.extra = tuple(extra)
        self.lanes = lane_shards(shards, cfg, epoch)
        counts = lane_batch_counts(shards, cfg, epoch)
        taken, start = resume_layout(counts, skip)
        # Lane order rotated so the restarted round-robin resumes where it stopped.
        self.order = [(start + i) % cfg.lanes for i in range(cfg.lanes)]
        self.skips = taken
        self.masker = BlockMasker(cfg.grid, cfg.mask_ratio, cfg.min_mask_patches)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            if info.num_workers != self.cfg.lanes:
                raise DataError(f"stream built for {self.cfg.lanes} lane(s) but the loader has "
                                f"{info.num_workers} workers")
            lane = self.order[info.id]
            yield from self.lane_batches(lane, self.skips[lane])
            return
        gens = [self.lane_batches(lane, self.skips[lane]) for lane in self.order]
        while gens:  # in-process: interleave lanes exactly like the DataLoader does with workers
            for g in list(gens):
                try:
                    yield next(g)
                except StopIteration:
                    gens.remove(g)

    def lane_batches(self, lane: int, skip_batches: int) -> Iterator[dict]:
        b = self.cfg.batch_size
        skip, pending = skip_batches * b, []
        for plan in self.lanes[lane]:
            if skip >= plan.samples:  # resume: whole shard already consumed, no I/O at all
                skip -= plan.samples
                continue
            for item in self.shard_items(plan):
                if skip:
                    skip -= 1  # consumed before the checkpoint: read, never decoded
                    continue
                pending.append(item)
                if len(pending) == b:
                    yield self.collate([self.load(it) for it in pending])
                    pending = []

    def shard_items(self, plan: ShardPlan) -> Iterator[tuple]:
        """(plan, index in cache shard, sample, view params or None, encoded targets or None, view), shuffled."""
        k = self.cfg.views if self.cache is not None else self.recipe.views  # a cache's first K: --cache-views
        view = views.view_for(self.cfg.seed, plan.name, self.epoch, k)
        keys, arrays, params = (self.cache.read_encoded(plan.name, view, targets=self.cfg.with_targets)
                                if self.cache is not None else (None, None, None))
        for j, other in enumerate(self.extra, 1):  # another teacher's targets on the same views
            k2, a2, p2 = other.read_encoded(plan.name, view, targets=self.cfg.with_targets)
            if k2 != keys or not np.array_equal(p2, params):
                raise DataError(f"shard {plan.name!r} view {view}: {other.url} does not line up with {self.cache.url} "
                                f"({'other keys' if k2 != keys else 'other view parameters'}); a second teacher's "
                                "cache is made with `mdcache extract ... --views-of` the first")
            arrays = {**arrays, **{f"t{j}/{n}": a for n, a in a2.items()}}
        rng = views.key_rng(self.cfg.seed, f"shuffle/{self.epoch}/{plan.name}")
        items = ((plan, i, s, None if params is None else params[i], arrays, view)
                 for i, s in enumerate(self.lockstep(plan, keys)))
        yield from shuffled(items, self.cfg.shuffle_buffer, rng)

    def lockstep(self, plan: ShardPlan, keys: list[str] | None) -> Iterator[Sample]:
        """Source samples of a shard, checked key by key against the cache shard."""
        skipped, i = set(plan.skipped), 0
        for s in iter_samples(plan.source, self.cfg.storage_options):
            if s.data is None or s.key in skipped:
                continue
            if keys is not None and (i >= len(keys) or s.key != keys[i]):
                have = repr(keys[i]) if i < len(keys) else f"only {len(keys)} samples"
                raise DataError(f"shard {plan.name!r}: source sample {i} is {s.key!r} but the cache has {have}. "
                                f"The source ({plan.source.url}) changed since extraction, or --source points at "
                                "other data.")
            yield s
            i += 1
        if i != plan.samples:
            raise DataError(f"shard {plan.name!r}: source {plan.source.url} yields {i} samples, "
                            f"expected {plan.samples} "
                            "(the source changed since extraction or since it was counted)")

    def load(self, item: tuple) -> dict:
        """Decode + replay the stored view + mask: the per-sample work, done in loader workers."""
        plan, i, sample, params, arrays, view = item
        where = self.cfg.replay_on
        image = views.decode_image(sample.data) if where != "device-decode" else None
        if params is None:  # online mode without a cache: the same sampler `mdcache extract` uses
            h, w = (image.height, image.width) if image else views.image_size_of(sample.data)
            params = views.sample_views(sample.key, h, w, self.recipe)[view]
        mask = self.masker(views.key_rng(self.cfg.seed, f"mask/{self.epoch}/{sample.key}"))
        out = {"mask": torch.from_numpy(mask.reshape(-1)), "key": sample.key, "shard": plan.name, "view": view}
        if where == "workers":
            out["image"] = views.view_pixels(image, params, self.cfg.image_size, self.cfg.replay)
        else:  # the decoded image (or the file) and its view: the step's device makes the pixels
            out["image"] = views.image_tensor(image) if image else views.encoded_tensor(sample.data)
            out["params"] = torch.from_numpy(np.asarray(params))
        if arrays is not None and self.cfg.with_targets:
            out["targets"] = {name: a[i] for name, a in arrays.items()}
        return out

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        batch = {"images": [s["image"] for s in samples] if "params" in samples[0] else
                 torch.stack([s["image"] for s in samples]),
                 "mask": torch.stack([s["mask"] for s in samples]),
                 "keys": [s["key"] for s in samples], "shards": [s["shard"] for s in samples],
                 "views": [s["view"] for s in samples]}
        if "targets" in samples[0]:
            batch["targets"] = {n: torch.from_numpy(np.stack([s["targets"][n] for s in samples]))
                                for n in samples[0]["targets"]}
        if "params" in samples[0]:
            batch["params"] = torch.stack([s["params"] for s in samples])
        return batch


def make_loader(stream: ShardStream, workers: int, pin_memory: bool = False,
                worker_init_fn=None) -> torch.utils.data.DataLoader:
    """Workers = lanes (checked). batch_size=None: lanes batch inside the workers. The loader gets its own
    generator: it would otherwise draw its seed from the global RNG and shift drop-path noise on resume."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=max(0, workers), pin_memory=pin_memory,
                                       prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
                                       worker_init_fn=worker_init_fn if workers > 0 else None,
                                       generator=torch.Generator().manual_seed(stream.cfg.seed))


def to_device(batch: dict, device: torch.device, cfg: StreamConfig | None = None) -> dict:
    """A batch on the device. A batch of decoded images (`--replay-on device`) has its views replayed there
    with the stream's (the cache's) implementation, a batch of image files (`device-decode`) is decoded there
    first: uint8 [B,3,S,S] either way."""
    out = dict(batch)
    if "params" in batch:
        images = batch["images"]
        if cfg.replay_on == "device-decode":
            try:
                images = views.decode_batch(images, device)
            except views.ImageDecodeError as e:
                raise DataError(f"shard {batch['shards'][e.index]!r}, sample {batch['keys'][e.index]!r}: {e}") from None
        out["images"] = views.replay_batch(images, list(out.pop("params").numpy()[:, None]), cfg.image_size,
                                           cfg.replay, device)  # one view per image
    else:
        out["images"] = batch["images"].to(device, non_blocking=True)
    out["mask"] = batch["mask"].to(device, non_blocking=True)
    if "targets" in batch:
        out["targets"] = {n: t.to(device, non_blocking=True) for n, t in batch["targets"].items()}
    return out


normalize = views.normalize  # uint8 [B,3,H,W] -> float32, on the images' device (the extractor's arithmetic)
