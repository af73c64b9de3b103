"""The FFCV commands: `mdtrain ffcv-build` (sources -> .beton) and `mdtrain bench-loader`. Reading a
.beton (`--loader ffcv`: JIT decode + crop) lives in `labelled`, next to the default loader.

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
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from mdcache import sources
from mdcache.commands import opt, storage_options_opt
from mdcache.errors import ConfigError
from mdcache.views import decode_image

from . import labelled
from .labelled import FfcvMissing, beton_info, require_ffcv  # noqa: F401 (the FFCV path's public names)


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
    out: str = opt("", "Output .beton path (a sidecar OUT.json records source, samples and classes).", required=True)
    max_resolution: int = opt(256, "Longest side stored (images are downscaled, never upscaled); 0 = keep.", ge=8)
    write_mode: str = opt("jpg", "FFCV image storage: jpg (compact), raw (fastest decode), smart.")
    jpeg_quality: int = opt(90, "JPEG quality when write-mode is jpg/smart.", ge=1, le=100)
    workers: int = opt(2, "Writer processes.", ge=0)
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE for remote sources (repeatable).")


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

    if not cfg.out:
        raise ConfigError("--out is required (e.g. train.beton)")
    if cfg.write_mode not in ("jpg", "raw", "smart"):
        raise ConfigError(f"--write-mode {cfg.write_mode!r}: expected jpg, raw or smart")
    so = cfg.storage_options
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
    writer = DatasetWriter(tmp, fields, num_workers=max(1, cfg.workers))
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
    print(json.dumps(build_beton(cfg)), flush=True)


# ----------------------------------------------------------------------------- benchmark

@dataclass
class BenchLoaderConfig:
    """Images/s of the FFCV loader vs the default loader on the same data, measured in one run."""

    source: str = opt("", "Labelled source (tar shards with .cls or a class folder).")
    beton: str = opt("", "The same data as a .beton; empty = built from --source into a temporary file first.")
    image_size: int = opt(224, "Output image side.", ge=1)
    batch_size: int = opt(64, "Batch size.", ge=1)
    workers: int = opt(2, "Workers for both loaders (processes for default, threads for FFCV).", ge=0)
    epochs: int = opt(2, "Passes over the data per loader; the best pass is reported (FFCV's first pass compiles).",
                      ge=1)
    max_resolution: int = opt(256, "When building the .beton: longest side stored.", ge=8)
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).")


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
    from timm.data import IMAGENET_DEFAULT_MEAN as MEAN
    from timm.data import IMAGENET_DEFAULT_STD as STD
    from timm.data import create_transform

    require_ffcv()
    so = cfg.storage_options
    info = labelled.scan_source(cfg.source, so)
    with tempfile.TemporaryDirectory(prefix="mdtrain-bench-") as tmp:
        beton = cfg.beton
        if not beton:
            beton = os.path.join(tmp, "bench.beton")
            build_beton(FfcvBuildConfig(source=cfg.source, out=beton, max_resolution=cfg.max_resolution,
                                        workers=cfg.workers, storage_options=cfg.storage_options))
        full = labelled.train_transform(cfg.image_size, (0.08, 1.0), "rand-m9-mstd0.5-inc1", 0.0, 0.25, "pixel", 1,
                                        MEAN, STD)
        plain = create_transform(cfg.image_size, is_training=True, color_jitter=None, interpolation="bilinear",
                                 mean=MEAN, std=STD)
        rows = {}
        for name, t in (("default (RandAugment + erasing)", full), ("default (crop + flip)", plain)):
            split = labelled.default_split(cfg.source, t, cfg.batch_size, cfg.workers, False, 0, info.num_classes,
                                           info.samples, 0, so)  # train=False: every image, no drop_last
            rows[name] = _timed_passes(split.batches, cfg.epochs)
        ffcv = labelled.ffcv_train_split(beton, cfg.batch_size, cfg.image_size, (0.08, 1.0), MEAN, STD, cfg.workers,
                                         0, 1, torch.device("cpu"), drop_last=False)
        rows["ffcv (crop + flip)"] = _timed_passes(ffcv.batches, cfg.epochs)
    out = {"images": info.samples, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
           "workers": cfg.workers, "loaders": {}}
    for name, (n, secs) in rows.items():
        out["loaders"][name] = {"images_per_pass": n, "seconds": [round(s, 4) for s in secs],
                                "images_per_s": round(n / min(secs), 1)}
    like = out["loaders"]["default (crop + flip)"]["images_per_s"]
    out["ffcv_speedup_vs_default_crop_flip"] = round(out["loaders"]["ffcv (crop + flip)"]["images_per_s"] / like, 2)
    return out


def run_bench_cli(cfg: BenchLoaderConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    r = bench_loader(cfg)
    t = Table(title=f"loader images/s: {r['images']} images, {r['image_size']}px, batch {r['batch_size']}, "
                    f"{r['workers']} workers, best of {cfg.epochs} passes")
    for col in ("loader", "images/s", "seconds per pass"):
        t.add_column(col)
    for name, v in r["loaders"].items():
        t.add_row(name, f"{v['images_per_s']:.1f}", ", ".join(f"{s:.2f}" for s in v["seconds"]))
    Console(stderr=True).print(t)
    print(json.dumps(r), flush=True)
