"""Labelled images for finetuning and evaluation: WebDataset shards with `.cls` or class folders.

The default loader (PIL decode + timm transforms) streams source shards through `mdcache.sources`
as a torch IterableDataset. Work is split by shard across (rank, dataloader worker) so every
sample is read by exactly one consumer; when there are fewer shards than consumers (small
validation sets), every consumer reads all shards and keeps every n-th sample instead.
"""
from __future__ import annotations

import math
import os
import tarfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from mdcache import sources
from mdcache.errors import ConfigError, UserError
from mdcache.views import decode_image

from .runtime import current_dist, rng_for, seed_all, seed_for, shuffled


class LabelError(UserError):
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
    fs, path = sources.open_fs(shard.url, storage_options)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    labels: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = sources.split_member(m.name)
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
        fs, root = sources.open_fs(shard.url, storage_options)
        return fs.cat_file(f"{root.rstrip('/')}/{e.path}")
    handles = _handles if _handles is not None else {}
    key = (os.getpid(), shard.url)
    if key not in handles:
        fs, path = sources.open_fs(shard.url, storage_options)
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
    With keys=True each item also carries its 'shard/key' (to check who read what).

    Undecodable images are skipped with a CorruptSampleWarning naming shard and key; a missing or
    out-of-range label is an error (a silently wrong label is worse than a crash).
    """

    def __init__(self, shards: list[sources.SourceShard], transform: Callable[[Image.Image], torch.Tensor],
                 num_classes: int, shuffle: bool = False, seed: int = 0, buffer: int = 1000,
                 storage_options: dict | None = None, keys: bool = False) -> None:
        super().__init__()
        self.shards, self.transform, self.num_classes = shards, transform, num_classes
        self.shuffle, self.seed, self.buffer, self.storage_options = shuffle, seed, buffer, storage_options
        self.keys = keys
        self.epoch = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Shard order, shuffle buffer and worker augmentation RNGs are a function of (seed, epoch)."""
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int]:
        d = current_dist()
        rank, world = d.rank, d.world
        w = torch.utils.data.get_worker_info()
        wid, nw = (w.id, w.num_workers) if w is not None else (0, 1)
        return rank * nw + wid, world * nw

    def samples(self) -> Iterator[tuple[Image.Image, int, str]]:
        """Decoded (image, label, 'shard/key') of this consumer's share, before shuffling."""
        consumer, consumers = self._consumer()
        shards = list(self.shards)
        if self.shuffle:
            shards = [shards[i] for i in rng_for(self.seed, "shards", self.epoch).permutation(len(shards))]
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
            seed_all(seed_for(self.seed, "worker", self.epoch, consumer))
        it = self.samples()
        if self.shuffle and self.buffer > 1:
            it = shuffled(it, self.buffer, rng_for(self.seed, "buffer", self.epoch, consumer))
        for img, label, key in it:
            yield (self.transform(img), label, key) if self.keys else (self.transform(img), label)


def labelled_loader(ds: LabelledShards, batch_size: int, workers: int, train: bool, seed: int, epoch: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over `ds` for one epoch (fresh workers each epoch so set_epoch reaches them)."""
    ds.set_epoch(epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=train,
                                       pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(seed_for(seed, "loader", epoch)),
                                       persistent_workers=False)


def batches_per_epoch(samples: int, batch_size: int, world: int) -> int:
    """Optimizer steps per epoch per rank for `samples` images (drop_last batches)."""
    return max(1, math.floor(samples / world / batch_size))


# ----------------------------------------------------------------------------- splits and transforms

@dataclass
class Split:
    """One labelled split behind either loader: how to get an epoch's batches, and its size."""

    samples: int
    num_classes: int
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]   # epoch -> (images, labels)


def data_config(model_name: str, norm: str = "imagenet") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std. 'imagenet' is what `mdtrain pretrain` feeds the student, so a finetune sees the
    pixels its backbone learned on; 'model' takes the timm model's pretrained config (e.g. 0.5/0.5 for
    augreg ViTs) for backbones that came from elsewhere."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if not timm.is_model(model_name):
        raise ConfigError(f"--model {model_name!r}: not a timm model name (see timm.list_models())")
    if norm == "imagenet":
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if norm != "model":
        raise ConfigError(f"--norm {norm!r}: expected imagenet or model")
    pcfg = timm.models.get_pretrained_cfg(model_name)
    mean = getattr(pcfg, "mean", None) or IMAGENET_DEFAULT_MEAN
    std = getattr(pcfg, "std", None) or IMAGENET_DEFAULT_STD
    return tuple(mean), tuple(std)


def default_split(spec: str, transform: Callable, batch_size: int, workers: int, train: bool, seed: int,
                  num_classes: int | None, samples: int | None, shuffle_buffer: int, storage_options: dict,
                  pin_memory: bool = False) -> Split:
    """The PIL/WebDataset stream: sources -> decode -> timm transform -> DataLoader.

    num_classes or samples None means "find out": one pass over the tar headers (cheap, no decode).
    samples < 0 means "not needed" (validation).
    """
    info = None
    if not num_classes or samples is None:
        info = scan_source(spec, storage_options)
    shards = info.shards if info else sources.list_source(spec, storage_options)
    n_cls = num_classes or info.num_classes
    ds = LabelledShards(shards, transform, n_cls, shuffle=train, seed=seed, buffer=shuffle_buffer,
                        storage_options=storage_options)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from labelled_loader(ds, batch_size, workers, train, seed, epoch, pin_memory)

    return Split(info.samples if samples is None else samples, n_cls, batches)


def train_transform(image_size: int, scale: tuple[float, float], aa: str | None, color_jitter: float, reprob: float,
                    remode: str, recount: int, mean: tuple, std: tuple) -> Callable:
    """timm's training transform: RandomResizedCrop, flip, RandAugment (or color jitter), random erasing."""
    from timm.data import create_transform

    patch_randaugment()
    return create_transform(image_size, is_training=True, scale=tuple(scale), auto_augment=aa or None,
                            color_jitter=color_jitter or None, interpolation="bicubic", re_prob=reprob,
                            re_mode=remode, re_count=recount, mean=mean, std=std)


def eval_transform(image_size: int, crop_pct: float, mean: tuple, std: tuple) -> Callable:
    """Resize to image_size / crop_pct, center crop image_size (bicubic)."""
    from timm.data import create_transform

    return create_transform(image_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=mean, std=std)


def posterize_compat(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, valid on Pillow >= 13: 0 bits kept is a black image (what older Pillow
    returned) instead of the ValueError that kills RandAugment's 'inc1' policy at magnitude 10."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_randaugment() -> None:
    """Route timm's Posterize ops through posterize_compat (must run before create_transform)."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize_compat


# ----------------------------------------------------------------------------- FFCV reading (--loader ffcv)

INSTALL_HINT = ("FFCV is not installed. It needs system packages and a pip install:\n"
                "  apt-get install -y --no-install-recommends pkg-config libturbojpeg0-dev libopencv-dev\n"
                "  pip install ffcv pillow\n"
                "(scripts/setup.sh does both). The default loader (--loader default) works without it.")


class FfcvMissing(UserError):
    """--loader ffcv or ffcv-build was asked for on a machine without FFCV."""


def require_ffcv():
    """Import ffcv or raise FfcvMissing with the install recipe (nothing imports it at module level)."""
    try:
        import ffcv
        from ffcv.loader import Loader  # noqa: F401  (fails if the compiled libraries are missing)
    except ImportError as e:
        raise FfcvMissing(f"{INSTALL_HINT}\n(import error: {e})") from None
    return ffcv


def beton_info(path: str) -> dict:
    """Samples and classes of a .beton (labels read from its metadata, no image decode)."""
    require_ffcv()
    from ffcv.reader import Reader

    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such .beton (build one with `mdtrain ffcv-build --source ... --out {path}`)")
    try:
        reader = Reader(path)
    except Exception as e:  # noqa: BLE001 - FFCV raises assorted errors on foreign files
        raise ConfigError(f"{path}: not an FFCV .beton file ({e})") from e
    if "label" not in reader.handlers or "image" not in reader.handlers:
        raise ConfigError(f"{path}: expected fields image and label, found {list(reader.handlers)}")
    labels = np.asarray(reader.metadata[f"f{list(reader.handlers).index('label')}"])  # fields are stored as f0, f1..
    return {"samples": int(reader.num_samples), "num_classes": int(labels.max()) + 1, "labels": labels}


def _beton_classes(path: str, num_classes: int | None) -> tuple[dict, int]:
    info = beton_info(path)
    n_cls = num_classes or info["num_classes"]
    lo, hi = int(info["labels"].min()), int(info["labels"].max())
    if lo < 0 or hi >= n_cls:
        raise LabelError(f"{path}: labels span {lo}..{hi}, outside 0..{n_cls - 1} (--num-classes {n_cls})")
    return info, n_cls


def _image_batches(loader, mean: tuple, std: tuple, device: torch.device, erasing=None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 NCHW batches from FFCV -> normalized float (copied out of FFCV's reused buffers)."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    for x, y in loader:
        x = (x.to(device).float() - m) / s  # blocking: FFCV reuses the pinned slot
        if erasing is not None:
            x = erasing(x)
        yield x.contiguous(), y.to(device).long().view(-1).clone()


def ffcv_train_split(path: str, batch_size: int, image_size: int, scale: tuple, mean: tuple, std: tuple,
                     workers: int, seed: int, world: int, device: torch.device, reprob: float = 0.0,
                     remode: str = "pixel", recount: int = 1, num_classes: int | None = None,
                     drop_last: bool = True) -> Split:
    """Training batches from a .beton: FFCV RandomResizedCrop + flip, then random erasing in torch."""
    require_ffcv()
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage
    from timm.data.random_erasing import RandomErasing

    info, n_cls = _beton_classes(path, num_classes)
    loader = Loader(path, batch_size=batch_size, num_workers=max(1, workers), order=OrderOption.RANDOM,
                    distributed=world > 1, seed=seed, drop_last=drop_last, os_cache=True,
                    pipelines={"image": [RandomResizedCropRGBImageDecoder((image_size, image_size), scale=scale),
                                         RandomHorizontalFlip(), ToTensor(), ToTorchImage(channels_last=False)],
                               "label": [IntDecoder(), ToTensor()]})
    erasing = RandomErasing(reprob, mode=remode, max_count=recount, device=str(device)) if reprob > 0 else None

    def batches(epoch: int):
        loader.next_epoch = epoch  # FFCV's order is a function of (seed, epoch): resume continues it
        yield from _image_batches(loader, mean, std, device, erasing)

    return Split(info["samples"], n_cls, batches)


def ffcv_val_split(path: str, batch_size: int, image_size: int, crop_pct: float, mean: tuple, std: tuple,
                   workers: int, rank: int, world: int, device: torch.device, num_classes: int | None = None) -> Split:
    """Validation batches: FFCV center crop (crop_pct of the short side) resized to image_size; each
    rank reads every world-th sample so no sample is counted twice."""
    require_ffcv()
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    info, n_cls = _beton_classes(path, num_classes)
    loader = Loader(path, batch_size=batch_size, num_workers=max(1, workers), order=OrderOption.SEQUENTIAL,
                    indices=np.arange(rank, info["samples"], world), drop_last=False, os_cache=True,
                    pipelines={"image": [CenterCropRGBImageDecoder((image_size, image_size), ratio=crop_pct),
                                         ToTensor(), ToTorchImage(channels_last=False)],
                               "label": [IntDecoder(), ToTensor()]})

    def batches(epoch: int):
        yield from _image_batches(loader, mean, std, device)

    return Split(info["samples"], n_cls, batches)


def val_split(spec: str, loader: str, image_size: int, crop_pct: float, mean: tuple, std: tuple, batch_size: int,
              workers: int, num_classes: int | None, device: torch.device, storage_options: dict) -> Split:
    """The validation split of either loader (eval and finetune read validation data the same way)."""
    if loader == "ffcv":
        d = current_dist()
        return ffcv_val_split(spec, batch_size, image_size, crop_pct, mean, std, workers, d.rank, d.world, device,
                              num_classes)
    if loader != "default":
        raise ConfigError(f"--loader {loader!r}: expected default or ffcv")
    return default_split(spec, eval_transform(image_size, crop_pct, mean, std), batch_size, workers, False, 0,
                         num_classes, -1, 0, storage_options, pin_memory=device.type == "cuda")
