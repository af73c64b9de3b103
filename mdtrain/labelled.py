"""Labelled images for finetuning and evaluation: WebDataset shards with `.cls` or class folders.

The default loader (PIL decode + timm transforms) streams source shards through `mdcache.sources`
as a torch IterableDataset. Work is split by shard across (rank, dataloader worker) so every
sample is read by exactly one consumer; when there are fewer shards than consumers (small
validation sets), every consumer reads all shards and keeps every n-th sample instead.
"""
from __future__ import annotations

import math
import os
import random
import tarfile
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from mdcache import sources
from mdcache.views import decode_image


class LabelError(ValueError):
    """A sample without a usable label, or a label outside --num-classes. The message names it."""


class CorruptSampleWarning(UserWarning):
    """An image that could not be decoded was skipped (the warning names shard and key)."""


@dataclass
class SourceInfo:
    """What one scan of a labelled source tells us: sizes and the label range."""

    shards: list[sources.SourceShard]
    samples: int
    max_label: int
    classes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else self.max_label + 1


def dist_info() -> tuple[int, int]:
    """(rank, world) of the current torch.distributed group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------- random access index

@dataclass(frozen=True)
class Entry:
    """Where one labelled image lives: shard index, key, and (tars) the image member's byte range."""

    shard: int
    key: str
    label: int
    offset: int = -1     # tar: data offset of the image member; folder: -1 (path = key + ext)
    size: int = 0
    path: str = ""       # folder: path relative to the folder root


def _tar_entries(i: int, shard: sources.SourceShard, storage_options: dict | None) -> list[Entry]:
    """Index one tar by walking its headers (seeks over image data; reads only the tiny .cls members)."""
    fs, path = sources._fs(shard.url, storage_options)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    labels: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = sources._split_member(m.name)
                if k not in groups:
                    groups[k] = {}
                    order.append(k)
                groups[k][ext] = m
                if ext == "cls":
                    labels[k] = tf.extractfile(m).read()
    except FileNotFoundError:
        raise sources.SourceError(f"source shard {shard.url!r} does not exist") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise sources.SourceError(f"source shard {shard.url!r} is truncated or corrupt: {e}") from e
    out = []
    for k in order:
        m = next((groups[k][e] for e in sources.IMAGE_EXTS if e in groups[k]), None)
        if m is None:
            continue
        out.append(Entry(i, k, _parse_label(labels.get(k), shard.url, k), m.offset_data, m.size))
    return out


def _parse_label(raw: bytes | None, where: str, key: str) -> int:
    if raw is None:
        raise LabelError(f"{where}: sample {key!r} has no .cls label (labelled data needs one per image)")
    try:
        return int(raw.decode().strip())
    except ValueError:
        raise LabelError(f"{where}: sample {key!r} has an unparseable .cls label {raw[:20]!r}") from None


def index_source(shards: list[sources.SourceShard], storage_options: dict | None = None) -> list[Entry]:
    """Every labelled image of a source, in stored order (used for counting and for random access)."""
    out: list[Entry] = []
    for i, shard in enumerate(shards):
        if shard.files:
            index = {c: j for j, c in enumerate(shard.classes)}
            for rel in shard.files:
                if "/" not in rel:
                    raise LabelError(f"{shard.url}/{rel}: image outside a class sub-folder (expected ROOT/CLASS/IMAGE)")
                out.append(Entry(i, rel.rsplit(".", 1)[0], index[rel.split("/")[0]], path=rel))
        else:
            out.extend(_tar_entries(i, shard, storage_options))
    return out


def scan_source(spec: str, storage_options: dict | None = None) -> SourceInfo:
    """List a source and count its samples and label range (one pass over tar headers)."""
    shards = sources.list_source(spec, storage_options)
    entries = index_source(shards, storage_options)
    if not entries:
        raise sources.SourceError(f"{spec}: no labelled images found")
    return SourceInfo(shards, len(entries), max(e.label for e in entries), shards[0].classes)


def read_entry(shards: list[sources.SourceShard], e: Entry, storage_options: dict | None = None,
               _handles: dict | None = None) -> bytes:
    """The encoded image bytes of one indexed entry (random access, handles cached per process)."""
    shard = shards[e.shard]
    if e.path:
        fs, root = sources._fs(shard.url, storage_options)
        return fs.cat_file(f"{root.rstrip('/')}/{e.path}")
    handles = _handles if _handles is not None else {}
    key = (os.getpid(), shard.url)
    if key not in handles:
        fs, path = sources._fs(shard.url, storage_options)
        handles[key] = fs.open(path, "rb")
    f = handles[key]
    f.seek(e.offset)
    data = f.read(e.size)
    if len(data) != e.size:
        raise sources.SourceError(f"source shard {shard.url!r} is truncated (sample {e.key!r})")
    return data


# ----------------------------------------------------------------------------- streaming dataset

def split_work(shards: list, consumer: int, consumers: int) -> tuple[list, int, int]:
    """(shards to read, keep every `mod`-th sample, starting at `rem`) for one consumer."""
    if len(shards) >= consumers:
        return shards[consumer::consumers], 1, 0
    return shards, consumers, consumer


class LabelledShards(torch.utils.data.IterableDataset):
    """(image tensor, label) pairs streamed from source shards; split by rank and worker by shard.

    Undecodable images are skipped with a CorruptSampleWarning naming shard and key; a missing or
    out-of-range label is an error (a silently wrong label is worse than a crash).
    """

    def __init__(self, shards: list[sources.SourceShard], transform: Callable[[Image.Image], torch.Tensor],
                 num_classes: int, shuffle: bool = False, seed: int = 0, buffer: int = 1000,
                 storage_options: dict | None = None) -> None:
        super().__init__()
        self.shards, self.transform, self.num_classes = shards, transform, num_classes
        self.shuffle, self.seed, self.buffer, self.storage_options = shuffle, seed, buffer, storage_options
        self.epoch = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Shard order, shuffle buffer and worker augmentation RNGs are a function of (seed, epoch)."""
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int]:
        rank, world = dist_info()
        w = torch.utils.data.get_worker_info()
        wid, nw = (w.id, w.num_workers) if w is not None else (0, 1)
        return rank * nw + wid, world * nw

    def samples(self) -> Iterator[tuple[Image.Image, int, str]]:
        """Decoded (image, label, 'shard/key') of this consumer's share, before shuffling."""
        consumer, consumers = self._consumer()
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 100003 + self.epoch).shuffle(shards)
        mine, mod, rem = split_work(shards, consumer, consumers)
        n = 0
        for shard in mine:
            for s in sources.iter_samples(shard, self.storage_options):
                if s.data is None:
                    continue
                n += 1
                if (n - 1) % mod != rem:
                    continue
                label = s.label
                if label is None:
                    raise LabelError(f"{shard.url}: sample {s.key!r} has no label "
                                     f"({s.meta.get('cls_error', 'no .cls member / class folder')})")
                if not 0 <= label < self.num_classes:
                    raise LabelError(f"{shard.url}: sample {s.key!r} has label {label}, outside "
                                     f"0..{self.num_classes - 1} (--num-classes {self.num_classes})")
                try:
                    img = decode_image(s.data)
                except Exception as e:  # PIL raises many types for bad bytes
                    self.skipped += 1
                    warnings.warn(f"{shard.url}: skipped undecodable image {s.key!r} ({type(e).__name__}: {e})",
                                  CorruptSampleWarning, stacklevel=2)
                    continue
                yield img, label, f"{shard.name}/{s.key}"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        consumer, _ = self._consumer()
        if torch.utils.data.get_worker_info() is not None:  # worker RNGs: reproducible per (seed, epoch, consumer)
            s = (self.seed * 1000003 + self.epoch * 1009 + consumer) % 2**31
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
        it = self.samples()
        if self.shuffle and self.buffer > 1:
            it = _shuffled(it, self.buffer, random.Random(self.seed * 7919 + self.epoch * 31 + consumer))
        for img, label, _ in it:
            yield self.transform(img), label


def _shuffled(it: Iterator, size: int, rng: random.Random) -> Iterator:
    """WebDataset-style shuffle buffer: bounded memory, good enough mixing across shards."""
    buf = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


def make_loader(ds: LabelledShards, batch_size: int, num_workers: int, train: bool, seed: int, epoch: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over `ds` for one epoch (fresh workers each epoch so set_epoch reaches them)."""
    ds.set_epoch(epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, drop_last=train,
                                       pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed + epoch),
                                       persistent_workers=False)


def steps_per_epoch(samples: int, batch_size: int, world: int) -> int:
    """Optimizer steps per epoch per rank for `samples` images (drop_last batches)."""
    return max(1, math.floor(samples / world / batch_size))

