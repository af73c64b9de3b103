"""The CPU input side, per core, old path and new path side by side in one run.

    python pipelines/bench/input_pipeline.py [--photos runs/photos] [--images 512] [--out runs/input]

On ImageNet-sized JPEGs of real photos (pipelines/bench/make_photos.py: 300-500 px, quality 90):

  extraction  decode + K=8 views (224 px, colour jitter 0.4) + pack, in one DataLoader worker process
              (one core), batches of 32 images through shared memory, as `mdcache extract` runs it:
                old: PIL replay, float32 views normalized in the worker (mdcache <= 0.1)
                new: the tensor replay, uint8 views (normalized on the device)
              -> views/s per core. Goal: >= 400.
  trainer     mdtrain's own loader (images + int8 targets of CLIP-B/16's shape, 224 px) in one worker, on
              a cache extracted with each replay -> images/s per core. Goal: >= 300.
  writer      the extractor's host work per view on a GPU machine (int8 targets of CLIP-B/16's shape:
              checksums, Blosc/Zstd, the Zarr write, chunks in parallel) -> views/s of one shard writer.

Also a profile of the new extraction worker (where the time goes, per image). Writes results.json and
table.md under --out. Run it on a quiet machine: each rate is the best of --repeats passes.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mdcache import codecs, sources, store, views  # noqa: E402
from mdcache.bench import null_teacher  # noqa: E402
from mdcache.extract import ExtractConfig, extract, image_views, prepare  # noqa: E402

TEACHER = "clip-b16"  # its output shape (196 x 768) and normalization; random weights, never run here


class Frames(torch.utils.data.IterableDataset):
    """Decode + K views + pack, in batches of `batch` images, with a given view function (old or new)."""

    def __init__(self, shards, recipe, batch, fn):
        self.shards, self.recipe, self.batch, self.fn = shards, recipe, batch, fn

    def __iter__(self):
        xs = []
        for shard in self.shards:
            for s in sources.iter_samples(shard):
                xs.append(self.fn(s, self.recipe))
                if len(xs) == self.batch:
                    yield torch.cat(xs)
                    xs = []
        if xs:
            yield torch.cat(xs)


def old_views(sample, recipe):
    """The worker's work as mdcache 0.1 did it: PIL replay, float32 normalized views."""
    image = views.decode_image(sample.data)
    params = views.sample_views(sample.key, image.height, image.width, recipe)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return torch.stack([views.to_tensor(views.replay(image, p, recipe.image_size, views.REPLAY_PIL), mean, std)
                        for p in params])


def new_views(sample, recipe):
    return image_views(sample, recipe)[0]


def one_worker_rate(dataset, per_item: int) -> float:
    """Items/s through one DataLoader worker (the main process only receives)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1, prefetch_factor=4)
    n, t0 = 0, None
    for i, x in enumerate(loader):
        if i == 1:  # the first batch pays the worker's start-up
            t0, n = time.perf_counter(), 0
        else:
            n += len(x) if isinstance(x, torch.Tensor) else len(x["keys"])
    return n / (time.perf_counter() - t0) if t0 else 0.0


def extraction(shards, repeats: int, k: int, size: int) -> dict:
    out = {}
    for name, fn, impl in (("old", old_views, views.REPLAY_PIL), ("new", new_views, views.REPLAY_TENSOR)):
        recipe = views.ViewRecipe(image_size=size, views=k, color_jitter=0.4, seed=0, replay=impl)
        out[name] = max(one_worker_rate(Frames(shards, recipe, 32, fn), 1) for _ in range(repeats))
    return out


def make_cache(spec: str, root: str, replay: str, size: int) -> str:
    """A K=2 int8 cache of the photos with CLIP-B/16-shaped random targets (a null teacher that returns noise:
    realistic bytes, no teacher compute)."""
    cfg = ExtractConfig(source=spec, root=root, teacher=TEACHER, random_init=True, views=2, image_size=size,
                        codec="int8", workers=1, batch_size=32, calib_images=32, replay=replay)
    p = prepare(cfg)
    url, summary = extract(cfg, progress=False, prepared=replace(p, teacher=null_teacher(p.teacher)))
    assert not summary["failed"], summary
    return url


def trainer(spec: str, tmp: str, repeats: int, size: int) -> dict:
    from mdtrain import data
    from mdtrain.pretrain import PretrainConfig, setup_data

    out = {}
    for name, impl, where in (("old", views.REPLAY_PIL, "workers"), ("new", views.REPLAY_TENSOR, "workers"),
                              ("new_replay_on_device", views.REPLAY_TENSOR, "device"),
                              ("new_decode_on_device", views.REPLAY_TENSOR, "device-decode")):
        url = make_cache(spec, os.path.join(tmp, impl), impl, size)
        setup = setup_data(PretrainConfig(cache=url, batch_size=64, workers=1, seed=0, replay_on=where),
                           torch.device("cpu"))
        assert setup.stream.replay == impl

        out[name] = max(one_worker_rate(data.ShardStream(setup.plan, setup.stream, 0, cache=setup.cache), 1)
                        for _ in range(repeats))
    return out


def writer(tmp: str, repeats: int, n: int = 256, k: int = 8) -> float:
    """Views/s of the extractor's host-side write: int8 codes of CLIP-B/16's shape from random features."""
    feats = torch.randn(n * k, 196, 768)
    codec = codecs.get_codec("int8")
    calib = codec.calibrate(feats[:64])
    enc = codec.encode(feats, calib)
    arrays = {a: np.ascontiguousarray(v.reshape(n, k, *v.shape[1:]).swapaxes(0, 1)) for a, v in enc.items()}
    params = np.zeros((k, n, len(views.VIEW_FIELDS)), np.int32)
    best = 0.0
    for r in range(repeats):
        t0 = time.perf_counter()
        store.write_shard_data(os.path.join(tmp, f"w{r}"), "s", [f"k{i}" for i in range(n)], arrays, params, {})
        best = max(best, n * k / (time.perf_counter() - t0))
    return best


def profile(shards, k: int, size: int, images: int = 64) -> str:
    """Where the new worker's time goes (cProfile of the work one worker does for `images` images)."""
    recipe = views.ViewRecipe(image_size=size, views=k, color_jitter=0.4, seed=0)
    samples = [s for _, s in zip(range(images), sources.iter_samples(shards[0]))]
    prof = cProfile.Profile()
    prof.enable()
    for s in samples:
        new_views(s, recipe)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="runs/photos")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--out", default="runs/input")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if not Path(a.photos, "photos-000000.tar").exists():
        sys.path.insert(0, str(ROOT / "pipelines" / "bench"))
        from make_photos import main as make_photos

        make_photos(["--out", a.photos, "--images", str(a.images), "--shards", "4"])
    spec = str(Path(a.photos) / "photos-{000000..000003}.tar")
    shards = sources.list_source(spec)
    with tempfile.TemporaryDirectory(prefix="mdcache-input-bench-") as tmp:
        r = {"images": a.images, "views": a.views, "size": a.size, "cpu": os.cpu_count(),
             "extraction_views_per_core": extraction(shards, a.repeats, a.views, a.size),
             "trainer_images_per_core": trainer(spec, tmp, a.repeats, a.size),
             "writer_views_per_s": writer(tmp, a.repeats), "profile_new_worker": profile(shards, a.views, a.size)}
    e, t = r["extraction_views_per_core"], r["trainer_images_per_core"]
    table = ["| per core | old path | new path | new / old | goal |", "| --- | --- | --- | --- | --- |",
             f"| extraction, views/s (K={a.views}, jitter 0.4, {a.size} px) | {e['old']:.0f} | {e['new']:.0f} | "
             f"{e['new'] / e['old']:.2f}x | >= 400: {'met' if e['new'] >= 400 else 'MISSED'} |",
             f"| trainer loader, images/s (images + int8 targets, {a.size} px) | {t['old']:.0f} | {t['new']:.0f} | "
             f"{t['new'] / t['old']:.2f}x | >= 300: {'met' if t['new'] >= 300 else 'MISSED'} |",
             f"| trainer loader, workers only decode (`--replay-on device`) | | "
             f"{t['new_replay_on_device']:.0f} | | |",
             f"| trainer loader, workers only read the files (`--replay-on device-decode`) | | "
             f"{t['new_decode_on_device']:.0f} | | |",
             f"| extraction writer, views/s (int8, CLIP-B/16 shape; {store.WRITE_THREADS} threads) | | "
             f"{r['writer_views_per_s']:.0f} | | |"]
    os.makedirs(a.out, exist_ok=True)
    Path(a.out, "results.json").write_text(json.dumps(r, indent=1))
    Path(a.out, "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(r["profile_new_worker"])


if __name__ == "__main__":
    main()
