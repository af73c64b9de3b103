"""The FFCV path: `mdtrain ffcv-build` (sources -> .beton) and `--loader ffcv` (JIT decode + crop).

FFCV is optional: it needs system libraries (pkg-config, libturbojpeg, OpenCV headers) and
`pip install ffcv pillow`. Nothing here imports it at module level, so the default loader keeps
working without it, and asking for it gives one actionable message.

What differs from the default loader: FFCV's pipeline is RandomResizedCrop + flip (compiled), so
there is no RandAugment; random erasing is applied on the batch in torch. Its crop RNG lives in
numba, so a --resume with --loader ffcv replays the sample order but not the exact crops.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mdcache import sources
from mdcache.config import opt
from mdcache.views import decode_image

from . import labelled

INSTALL_HINT = ("FFCV is not installed. It needs system packages and a pip install:\n"
                "  apt-get install -y --no-install-recommends pkg-config libturbojpeg0-dev libopencv-dev\n"
                "  pip install ffcv pillow\n"
                "(scripts/setup.sh does both). The default loader (--loader default) works without it.")


class FfcvMissing(RuntimeError):
    """--loader ffcv or ffcv-build was asked for on a machine without FFCV."""


def require_ffcv():
    """Import ffcv or raise FfcvMissing with the install recipe."""
    try:
        import ffcv  # noqa: F401
        from ffcv.loader import Loader  # noqa: F401  (fails if the compiled libraries are missing)
    except ImportError as e:
        raise FfcvMissing(f"{INSTALL_HINT}\n(import error: {e})") from None
    return ffcv


def ffcv_available() -> bool:
    try:
        require_ffcv()
        return True
    except FfcvMissing:
        return False


# ----------------------------------------------------------------------------- writing

@dataclass
class FfcvBuildConfig:
    """Write an FFCV .beton (image + label) from WebDataset shards with .cls or a class folder."""

    source: str = opt("", "Labelled source: tar shards with .cls (brace pattern, glob, list) or a class folder.")
    out: str = opt("", "Output .beton path (a sidecar OUT.json records source, samples and classes).")
    max_resolution: int = opt(256, "Longest side stored (images are downscaled, never upscaled); 0 = keep.")
    write_mode: str = opt("jpg", "FFCV image storage: jpg (compact), raw (fastest decode), smart.")
    jpeg_quality: int = opt(90, "JPEG quality when write-mode is jpg/smart.")
    num_workers: int = opt(2, "Writer processes.")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE for remote sources (repeatable).")


class IndexedImages:
    """Random access (image uint8 HWC, label) over a source's index, for FFCV's indexed writer.

    An undecodable image is recorded in `bad_log` (one line each) and replaced by a 1x1 pixel so
    FFCV's writer (which hangs if a worker dies) finishes; the build then fails naming them.
    """

    def __init__(self, shards: list[sources.SourceShard], entries: list[labelled.Entry], storage_options: dict,
                 bad_log: str) -> None:
        self.shards, self.entries, self.so, self.bad_log = shards, entries, storage_options, bad_log
        self._handles: dict = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        e = self.entries[i]
        try:
            img = np.asarray(decode_image(labelled.read_entry(self.shards, e, self.so, self._handles)), dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - recorded and reported after the write
            with open(self.bad_log, "a") as f:
                f.write(f"{self.shards[e.shard].url}: {e.key!r}: {type(exc).__name__}: {exc}\n")
            img = np.zeros((1, 1, 3), np.uint8)
        return np.ascontiguousarray(img), e.label


def build_beton(cfg: FfcvBuildConfig) -> dict:
    """Index the source, write the .beton with FFCV's DatasetWriter, write OUT.json; return a summary."""
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from .finetune import _storage_options

    if not cfg.out:
        raise ValueError("--out is required (e.g. train.beton)")
    if cfg.write_mode not in ("jpg", "raw", "smart"):
        raise ValueError(f"--write-mode {cfg.write_mode!r}: expected jpg, raw or smart")
    so = _storage_options(cfg.storage_option)
    shards = sources.list_source(cfg.source, so)
    entries = labelled.index_source(shards, so)
    if not entries:
        raise sources.SourceError(f"{cfg.source}: no labelled images found")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    tmp, bad_log = cfg.out + ".tmp", cfg.out + ".bad.txt"
    for p in (tmp, bad_log):
        if os.path.exists(p):
            os.remove(p)
    t0 = time.perf_counter()
    fields = {"image": RGBImageField(write_mode=cfg.write_mode, max_resolution=cfg.max_resolution or None,
                                     jpeg_quality=cfg.jpeg_quality),
              "label": IntField()}
    writer = DatasetWriter(tmp, fields, num_workers=max(1, cfg.num_workers))
    writer.from_indexed_dataset(IndexedImages(shards, entries, so, bad_log))
    if os.path.exists(bad_log):
        with open(bad_log) as f:
            bad = f.read().splitlines()
        os.remove(tmp)
        raise sources.SourceError(f"{len(bad)} undecodable image(s); {cfg.out} not written (list in {bad_log}):\n  "
                                  + "\n  ".join(bad[:10]))
    os.replace(tmp, cfg.out)
    labels = [e.label for e in entries]
    summary = {"source": cfg.source, "out": cfg.out, "samples": len(entries), "num_classes": max(labels) + 1,
               "classes": list(shards[0].classes), "max_resolution": cfg.max_resolution, "write_mode": cfg.write_mode,
               "bytes": os.path.getsize(cfg.out), "seconds": round(time.perf_counter() - t0, 2)}
    with open(cfg.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def run_build_cli(cfg: FfcvBuildConfig) -> None:
    from .finetune import run_command

    print(json.dumps(run_command(build_beton, cfg)))


# ----------------------------------------------------------------------------- reading

def beton_info(path: str) -> dict:
    """Samples and classes of a .beton (labels read from its metadata, no image decode)."""
    require_ffcv()
    from ffcv.reader import Reader

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such .beton (build one with `mdtrain ffcv-build --source ... --out {path}`)")
    try:
        reader = Reader(path)
    except Exception as e:  # noqa: BLE001 - FFCV raises assorted errors on foreign files
        raise ValueError(f"{path}: not an FFCV .beton file ({e})") from e
    if "label" not in reader.handlers or "image" not in reader.handlers:
        raise ValueError(f"{path}: expected fields image and label, found {list(reader.handlers)}")
    labels = np.asarray(reader.metadata[f"f{list(reader.handlers).index('label')}"])  # fields are stored as f0, f1..
    return {"samples": int(reader.num_samples), "num_classes": int(labels.max()) + 1, "labels": labels}


def _image_batches(loader, mean: tuple, std: tuple, device: torch.device, erasing=None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 NCHW batches from FFCV -> normalized float (copied out of FFCV's reused buffers)."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    for x, y in loader:
        x = (x.to(device).float() - m) / s
        if erasing is not None:
            x = erasing(x)
        yield x.contiguous(), y.to(device).long().view(-1).clone()


def train_split(path: str, batch_size: int, input_size: int, scale: tuple, mean: tuple, std: tuple, num_workers: int,
                seed: int, world: int, device: torch.device, reprob: float = 0.0, remode: str = "pixel",
                recount: int = 1, num_classes: int = 0, drop_last: bool = True):
    """Training batches from a .beton: FFCV RandomResizedCrop + flip, then random erasing in torch."""
    require_ffcv()
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage
    from timm.data.random_erasing import RandomErasing

    from .finetune import Split

    info = beton_info(path)
    n_cls = num_classes or info["num_classes"]
    _check_labels(path, info, n_cls)
    loader = Loader(path, batch_size=batch_size, num_workers=max(1, num_workers), order=OrderOption.RANDOM,
                    distributed=world > 1, seed=seed, drop_last=drop_last, os_cache=True,
                    pipelines={"image": [RandomResizedCropRGBImageDecoder((input_size, input_size), scale=scale),
                                         RandomHorizontalFlip(), ToTensor(), ToTorchImage(channels_last=False)],
                               "label": [IntDecoder(), ToTensor()]})
    erasing = RandomErasing(reprob, mode=remode, max_count=recount, device=str(device)) if reprob > 0 else None

    def batches(epoch: int):
        loader.next_epoch = epoch  # FFCV's order is a function of (seed, epoch): resume continues it
        yield from _image_batches(loader, mean, std, device, erasing)

    return Split(info["samples"], n_cls, batches)


def val_split(path: str, batch_size: int, input_size: int, crop_pct: float, mean: tuple, std: tuple,
              num_workers: int, rank: int, world: int, device: torch.device, num_classes: int = 0):
    """Validation batches: FFCV center crop (crop_pct of the short side) resized to input_size; each
    rank reads every world-th sample so no sample is counted twice."""
    require_ffcv()
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    from .finetune import Split

    info = beton_info(path)
    n_cls = num_classes or info["num_classes"]
    _check_labels(path, info, n_cls)
    loader = Loader(path, batch_size=batch_size, num_workers=max(1, num_workers), order=OrderOption.SEQUENTIAL,
                    indices=np.arange(rank, info["samples"], world), drop_last=False, os_cache=True,
                    pipelines={"image": [CenterCropRGBImageDecoder((input_size, input_size), ratio=crop_pct),
                                         ToTensor(), ToTorchImage(channels_last=False)],
                               "label": [IntDecoder(), ToTensor()]})

    def batches(epoch: int):
        yield from _image_batches(loader, mean, std, device)

    return Split(info["samples"], n_cls, batches)


def _check_labels(path: str, info: dict, num_classes: int) -> None:
    lo, hi = int(info["labels"].min()), int(info["labels"].max())
    if lo < 0 or hi >= num_classes:
        raise labelled.LabelError(f"{path}: labels span {lo}..{hi}, outside 0..{num_classes - 1} "
                                  f"(--num-classes {num_classes})")


# ----------------------------------------------------------------------------- benchmark

@dataclass
class BenchLoaderConfig:
    """Images/s of the FFCV loader vs the default loader on the same data, measured in one run."""

    source: str = opt("", "Labelled source (tar shards with .cls or a class folder).")
    beton: str = opt("", "The same data as a .beton; empty = built from --source into a temporary file first.")
    input_size: int = opt(224, "Output image side.")
    batch_size: int = opt(64, "Batch size.")
    num_workers: int = opt(2, "Workers for both loaders (processes for default, threads for FFCV).")
    epochs: int = opt(2, "Passes over the data per loader; the best pass is reported (FFCV's first pass compiles).")
    max_resolution: int = opt(256, "When building the .beton: longest side stored.")
    storage_option: list[str] = opt([], "fsspec storage option KEY=VALUE (repeatable).")


def _timed_passes(batches, epochs: int) -> tuple[int, list[float]]:
    secs, n = [], 0
    for epoch in range(epochs):
        n, t0 = 0, time.perf_counter()
        for x, _ in batches(epoch):
            n += len(x)
        secs.append(time.perf_counter() - t0)
    return n, secs


def bench_loader(cfg: BenchLoaderConfig) -> dict:
    """Time three loaders over the same images: default with the full finetune transform, default
    with the same crop+flip as FFCV (the like-for-like number), and FFCV. Every pass delivers every
    image as a normalized float batch; the default loader's pass includes starting its workers,
    as it does every epoch in finetune."""
    import tempfile

    from timm.data import IMAGENET_DEFAULT_MEAN as MEAN, IMAGENET_DEFAULT_STD as STD, create_transform

    from .finetune import _storage_options, default_split, patch_randaugment

    require_ffcv()
    patch_randaugment()
    so = _storage_options(cfg.storage_option)
    info = labelled.scan_source(cfg.source, so)
    with tempfile.TemporaryDirectory(prefix="mdtrain-bench-") as tmp:
        beton = cfg.beton
        if not beton:
            beton = os.path.join(tmp, "bench.beton")
            build_beton(FfcvBuildConfig(source=cfg.source, out=beton, max_resolution=cfg.max_resolution,
                                        num_workers=cfg.num_workers, storage_option=cfg.storage_option))
        full = create_transform(cfg.input_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                interpolation="bicubic", re_prob=0.25, re_mode="pixel", mean=MEAN, std=STD)
        plain = create_transform(cfg.input_size, is_training=True, color_jitter=None, interpolation="bilinear",
                                 mean=MEAN, std=STD)
        rows = {}
        for name, t in (("default (RandAugment + erasing)", full), ("default (crop + flip)", plain)):
            split = default_split(cfg.source, t, cfg.batch_size, cfg.num_workers, False, 0, info.num_classes,
                                  info.samples, 0, so)  # train=False: every image, no drop_last
            rows[name] = _timed_passes(split.batches, cfg.epochs)
        ffcv = train_split(beton, cfg.batch_size, cfg.input_size, (0.08, 1.0), MEAN, STD, cfg.num_workers, 0, 1,
                           torch.device("cpu"), drop_last=False)
        rows["ffcv (crop + flip)"] = _timed_passes(ffcv.batches, cfg.epochs)
    out = {"images": info.samples, "input_size": cfg.input_size, "batch_size": cfg.batch_size,
           "num_workers": cfg.num_workers, "loaders": {}}
    for name, (n, secs) in rows.items():
        out["loaders"][name] = {"images_per_pass": n, "seconds": [round(s, 3) for s in secs],
                                "images_per_s": round(n / min(secs), 1)}
    like = out["loaders"]["default (crop + flip)"]["images_per_s"]
    out["ffcv_speedup_vs_default_crop_flip"] = round(out["loaders"]["ffcv (crop + flip)"]["images_per_s"] / like, 2)
    return out


def run_bench_cli(cfg: BenchLoaderConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from .finetune import run_command

    r = run_command(bench_loader, cfg)
    t = Table(title=f"loader images/s: {r['images']} images, {r['input_size']}px, batch {r['batch_size']}, "
                    f"{r['num_workers']} workers, best of {cfg.epochs} passes")
    for col in ("loader", "images/s", "seconds per pass"):
        t.add_column(col)
    for name, v in r["loaders"].items():
        t.add_row(name, f"{v['images_per_s']:.1f}", ", ".join(f"{s:.2f}" for s in v["seconds"]))
    Console(stderr=True).print(t)
    print(json.dumps(r))
