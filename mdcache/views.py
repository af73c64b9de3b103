"""Views: sample a crop+flip once, store it explicitly, replay it identically in both stages.

A view is 11 integers (see `VIEW_FIELDS`): the crop box, the flip, the source size, and the color
jitter factors (x 1e6) with their order. Storing parameters (not an RNG seed) means the student
sees exactly what the teacher saw even when numpy/torchvision change their samplers.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

VIEW_FIELDS = ("top", "left", "height", "width", "flip", "src_height", "src_width",
               "brightness_e6", "contrast_e6", "saturation_e6", "jitter_order")
JITTER_SCALE = 1_000_000  # factors are stored as integers: factor * 1e6 (1e6 = unchanged)
JITTER_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))  # brightness, contrast, saturation
# Recorded in the cache fingerprint: changing how replay() resamples changes the cache id.
REPLAY_IMPL = "pil-rgb-crop-bicubic-flip-enhance-v1"


@dataclass(frozen=True)
class ViewRecipe:
    """How views are drawn. Part of the cache fingerprint."""

    image_size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    views: int = 2
    seed: int = 0
    color_jitter: float = 0.0  # brightness = contrast = saturation strength (BEiT v2 uses 0.4); 0: off

    def identity(self) -> dict:
        return {"image_size": self.image_size, "scale": list(self.scale), "ratio": [round(r, 8) for r in self.ratio],
                "flip": self.flip, "views": self.views, "seed": self.seed, "color_jitter": self.color_jitter,
                "replay": REPLAY_IMPL}


def key_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, sample key): stable across shard layouts and workers."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def view_for(seed: int, shard: str, epoch: int, k: int) -> int:
    """Which stored view a shard uses in an epoch (mdtrain and `mdcache.wds` alike): each block of K epochs
    is a permutation of the K views, so every view is used once per K epochs."""
    return int(key_rng(seed, f"views/{shard}/{epoch // k}").permutation(k)[epoch % k])


def sample_crop(rng: np.random.Generator, height: int, width: int,
                scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box sampler (torchvision's algorithm, numpy RNG): (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: central crop at the closest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_views(key: str, height: int, width: int, recipe: ViewRecipe) -> np.ndarray:
    """K views of one image as an int32 array [K, 11] (columns: VIEW_FIELDS)."""
    rng = key_rng(recipe.seed, key)
    out = np.zeros((recipe.views, len(VIEW_FIELDS)), dtype=np.int32)
    j = recipe.color_jitter
    for k in range(recipe.views):
        top, left, h, w = sample_crop(rng, height, width, recipe.scale, recipe.ratio)
        flip = bool(rng.random() < 0.5) if recipe.flip else False
        factors, order = (JITTER_SCALE,) * 3, 0
        if j > 0:  # torchvision ColorJitter(j, j, j): factors uniform in [max(0, 1-j), 1+j], random order
            factors = tuple(int(round(rng.uniform(max(0.0, 1 - j), 1 + j) * JITTER_SCALE)) for _ in range(3))
            order = int(rng.integers(len(JITTER_ORDERS)))
        out[k] = (top, left, h, w, int(flip), height, width, *factors, order)
    return out


def replay(image: Image.Image, params: np.ndarray | tuple, size: int) -> Image.Image:
    """The one function that turns (decoded image, stored view params) into the view's pixels."""
    top, left, h, w, flip, src_h, src_w, *jitter = (int(v) for v in params)
    image = image.convert("RGB")
    if image.size != (src_w, src_h):
        raise ValueError(f"view was sampled on a {src_w}x{src_h} image but the decoded image is "
                         f"{image.size[0]}x{image.size[1]}: source changed since extraction")
    # Same as torchvision.transforms.functional.resized_crop on PIL (crop, then bicubic resize).
    view = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if flip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if jitter and jitter[:3] != [JITTER_SCALE] * 3:
        # torchvision's adjust_brightness/contrast/saturation on PIL are exactly these enhancers
        from PIL import ImageEnhance

        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        for i in JITTER_ORDERS[jitter[3]]:
            view = enhancers[i](view).enhance(jitter[i] / JITTER_SCALE)
    return view


def to_tensor(view: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]):
    """PIL view -> normalized float32 CHW tensor. Teacher and student differ only in mean/std."""
    import torch

    x = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (so truncation fails here, not later) as RGB. 16-bit and 32-bit images are
    scaled to 8 bits by their type's range: Pillow's own convert("RGB") clips them, so a 16-bit PNG would
    come out almost all white."""
    import io

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            full = 65535.0 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 255.0
            scaled = np.clip(np.asarray(im, dtype=np.float64) * (255.0 / full) + 0.5, 0, 255).astype(np.uint8)
            return Image.fromarray(scaled, mode="L").convert("RGB")
        if im.mode == "F":
            return Image.fromarray(np.clip(np.asarray(im) + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
        return im.convert("RGB")
