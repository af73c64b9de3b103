"""A small photo set built offline from photos bundled with scikit-image: the test suite's and the
benchmarks' data (the demo itself runs on Fashion-MNIST, pipelines/study/make_data.py).

Each photo is a class; train/val images are different random crops of it (real pixels, no downloads),
written as WebDataset shards with .jpg + .cls members:

    python pipelines/demo/make_data.py --out data/demo
    -> data/demo/train-{000000..000003}.tar, data/demo/val-000000.tar, data/demo/classes.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "horse", "moon", "page",
          "text", "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo",
          "motorcycle_left")


def load_photos(max_classes: int) -> dict[str, Image.Image]:
    import skimage.data as data

    out = {}
    for name in PHOTOS:
        fn = getattr(data, name, None) or (lambda: data.stereo_motorcycle()[0])
        try:
            arr = np.asarray(fn())
        except Exception:  # a photo that scikit-image would have to download: skip it
            continue
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9)).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        out[name] = Image.fromarray(arr).convert("RGB")
        if len(out) == max_classes:
            break
    return out


def random_crop(img: Image.Image, rng: np.random.Generator, out_size: int) -> Image.Image:
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.5, 0.9))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return img.crop((x, y, x + side, y + side)).resize((out_size, out_size), Image.BICUBIC)


def write_shard(path: str, samples: list[tuple[str, Image.Image, int]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, img, label in samples:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=12)
    p.add_argument("--val-per-class", type=int, default=4)
    p.add_argument("--train-shards", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="side of the stored crops (pixels)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    photos = load_photos(a.classes)
    os.makedirs(a.out, exist_ok=True)
    train, val = [], []
    for label, (name, img) in enumerate(photos.items()):
        train += [(f"{name}-{i:03d}", random_crop(img, rng, a.size), label) for i in range(a.train_per_class)]
        val += [(f"{name}-val{i:03d}", random_crop(img, rng, a.size), label) for i in range(a.val_per_class)]
    order = rng.permutation(len(train))
    train = [train[i] for i in order]
    per = -(-len(train) // a.train_shards)
    for s in range(a.train_shards):
        write_shard(os.path.join(a.out, f"train-{s:06d}.tar"), train[s * per:(s + 1) * per])
    write_shard(os.path.join(a.out, "val-000000.tar"), val)
    with open(os.path.join(a.out, "classes.json"), "w") as f:
        json.dump(list(photos), f)
    print(f"{len(photos)} classes, {len(train)} train images in {a.train_shards} shards, {len(val)} val images "
          f"-> {a.out}")


if __name__ == "__main__":
    main()
