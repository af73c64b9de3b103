"""ImageNet-sized JPEGs from real photos, offline: the input-pipeline benchmarks' data.

ImageNet's training images average about 400x350 pixels, JPEG quality around 90. The photos bundled
with scikit-image and scikit-learn are cut into random crops of varied aspect (3:4 to 4:3 and a few
wider), resized so that the longer side is 300-500 px, and saved at quality 90 into WebDataset shards
(.jpg + .cls, the class being the source photo):

    python pipelines/bench/make_photos.py --out data/photos --images 512 --shards 4
    -> data/photos/photos-{000000..000003}.tar
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile

import numpy as np
from PIL import Image

SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "motorcycle_left", "immunohistochemistry",
           "hubble_deep_field", "brick", "grass", "gravel", "coins", "clock")


def photos() -> list[Image.Image]:
    """Every real colour or grey photo available offline, as RGB."""
    import skimage.data as data

    out = []
    for name in SKIMAGE:
        try:
            arr = np.asarray((getattr(data, name, None) or (lambda: data.stereo_motorcycle()[0]))())
        except Exception:  # one scikit-image would have to download
            continue
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9)).astype(np.uint8)
        out.append(Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).convert("RGB"))
    try:
        from sklearn.datasets import load_sample_images

        out += [Image.fromarray(a) for a in load_sample_images().images]
    except Exception:  # scikit-learn is optional
        pass
    return out


def imagenet_sized(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random window of the photo (aspect 3:4..4:3, sometimes 16:9) with the longer side 300-500 px, cut at
    the photo's own resolution or reduced (never enlarged, when the photo allows): real detail, as a camera
    image downsized for ImageNet has, not the smooth pixels of an upscaled crop."""
    w, h = img.size
    aspect = 16 / 9 if rng.random() < 0.1 else float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
    if rng.random() < 0.5:
        aspect = 1 / aspect  # portrait as often as landscape
    long_side = int(rng.integers(300, 501))
    tw, th = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    most = min(w / tw, h / th)  # the largest window of this shape that fits, relative to the target size
    s = float(rng.uniform(min(1.0, most), most)) if most > 1 else most
    cw, ch = min(w, round(tw * s)), min(h, round(th * s))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.resize((tw, th), Image.BICUBIC, box=(x, y, x + cw, y + ch), reducing_gap=None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    pics, rng = photos(), np.random.default_rng(args.seed)
    per = -(-args.images // args.shards)
    for s in range(args.shards):
        with tarfile.open(os.path.join(args.out, f"photos-{s:06d}.tar"), "w") as tf:
            for i in range(s * per, min(args.images, (s + 1) * per)):
                label = int(rng.integers(len(pics)))
                buf = io.BytesIO()
                imagenet_sized(pics[label], rng).save(buf, format="JPEG", quality=args.quality)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"photo-{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    print(os.path.join(args.out, f"photos-{{000000..{args.shards - 1:06d}}}.tar"))


if __name__ == "__main__":
    main()
