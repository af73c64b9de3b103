"""Fashion-MNIST (Debian package `dataset-fashion-mnist`, installed offline) as shuffled WebDataset shards.

70,000 real photos of clothes in 10 classes, 28x28 grayscale, read from the package's idx files and
written with webdataset's ShardWriter as .png + .cls members. Samples are shuffled across classes
before sharding: a class-sorted shard would give every training batch one or two classes.

    python pipelines/study/make_data.py --out data/fmnist [--train-size 55000 --val-size 5000 --subset-size 2000]
    -> data/fmnist/train-*.tar, val-*.tar, subset-*.tar (a class-balanced subset of train), test-*.tar,
       classes.json
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os

import numpy as np
from PIL import Image

PACKAGE_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format: big-endian dims after a 4-byte magic) as a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.exists(images):
        raise SystemExit(f"{images} not found: install the Debian package (apt-get install dataset-fashion-mnist) "
                         f"or pass --root to a folder holding the four idx .gz files")
    return read_idx(images), read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))


def write_split(out: str, name: str, images: np.ndarray, labels: np.ndarray, shard_size: int,
                rng: np.random.Generator) -> int:
    import webdataset as wds

    order = rng.permutation(len(images))
    with wds.ShardWriter(os.path.join(out, f"{name}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i in order:
            buf = io.BytesIO()
            Image.fromarray(images[i], mode="L").save(buf, format="PNG")
            sink.write({"__key__": f"{name}-{i:05d}", "png": buf.getvalue(), "cls": str(int(labels[i])).encode()})
    return -(-len(images) // shard_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/fmnist")
    p.add_argument("--root", default=PACKAGE_DIR, help="folder with the idx .gz files")
    p.add_argument("--train-size", type=int, default=60000, help="training images (after shuffling)")
    p.add_argument("--val-size", type=int, default=0, help="validation images, from the training split, disjoint "
                                                           "from --train-size's (for every selection: val-*.tar)")
    p.add_argument("--subset-size", type=int, default=0, help="a class-balanced subset of the training images, as "
                                                              "subset-*.tar (students distil and finetune on it)")
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--shard-size", type=int, default=5000, help="images per shard")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.out, exist_ok=True)
    counts = {}
    images, labels = load_split(a.root, "train")
    order = rng.permutation(len(images))
    if a.train_size + a.val_size > len(images):
        raise SystemExit(f"--train-size {a.train_size} + --val-size {a.val_size} > {len(images)} training images")
    train, val = np.sort(order[:a.train_size]), np.sort(order[a.train_size:a.train_size + a.val_size])
    parts = [("train", train), ("val", val)]
    if a.subset_size:  # exactly subset/10 images of each class, drawn from the training images
        per = a.subset_size // len(CLASSES)
        parts.append(("subset", np.sort(np.concatenate([rng.permutation(train[labels[train] == c])[:per]
                                                        for c in range(len(CLASSES))]))))
    t_images, t_labels = load_split(a.root, "test")
    for split, keep in parts:  # the subset in 8 shards: shard order is part of a training epoch's shuffle
        size = a.shard_size if split != "subset" else max(1, -(-len(keep) // 8))
        if len(keep):
            counts[split] = write_split(a.out, split, images[keep], labels[keep], size, rng)
    keep = np.sort(rng.permutation(len(t_images))[:a.test_size])  # a random subset, in package order
    counts["test"] = write_split(a.out, "test", t_images[keep], t_labels[keep], a.shard_size, rng)
    with open(os.path.join(a.out, "classes.json"), "w") as f:
        json.dump(list(CLASSES), f)
    print("Fashion-MNIST: " + ", ".join(f"{split} {n} shard(s)" for split, n in counts.items()) + f" -> {a.out}")


if __name__ == "__main__":
    main()
