"""Views: sample a crop+flip once, store it explicitly, replay it identically in both stages.

A view is 11 integers (see `VIEW_FIELDS`): the crop box, the flip, the source size, and the color
jitter factors (x 1e6) with their order. Storing parameters (not an RNG seed) means the student
sees exactly what the teacher saw even when numpy/torchvision change their samplers.

How parameters become pixels is a named implementation, recorded in the cache's fingerprint, and the
trainer always replays with the cache's own:

    pil-rgb-crop-bicubic-flip-enhance-v1   PIL crop, bicubic resize, flip, ImageEnhance jitter (caches before 0.2)
    tensor-bicubic-aa-v1                   uint8 torch ops: antialiased bicubic resize (the kernel PIL uses,
                                           separable, width then height, rounded to uint8 in between), flip,
                                           jitter in float32 rounded once; 3x faster on a CPU, and the same
                                           function runs on a GPU, flips and jitter batched (`replay_batch`)
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

VIEW_FIELDS = ("top", "left", "height", "width", "flip", "src_height", "src_width",
               "brightness_e6", "contrast_e6", "saturation_e6", "jitter_order")
JITTER_SCALE = 1_000_000  # factors are stored as integers: factor * 1e6 (1e6 = unchanged)
JITTER_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))  # brightness, contrast, saturation
# Recorded in the cache fingerprint: a replay that changes pixels is a new name, and the old ones stay.
REPLAY_PIL = "pil-rgb-crop-bicubic-flip-enhance-v1"
REPLAY_TENSOR = "tensor-bicubic-aa-v1"
REPLAYS = (REPLAY_PIL, REPLAY_TENSOR)
REPLAY_IMPL = REPLAY_TENSOR  # what new caches use
# How JPEGs become pixels, when it changes them: PIL and torchvision on a CPU are both libjpeg-turbo (the same
# pixels), nvJPEG (`--replay-on device-decode` on a GPU) rounds its IDCT otherwise, so it is its own recipe.
DECODER_CPU, DECODER_NVJPEG = "libjpeg-turbo", "nvjpeg"
GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale


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
    replay: str = REPLAY_IMPL
    decoder: str = DECODER_CPU

    def identity(self) -> dict:
        return {"image_size": self.image_size, "scale": list(self.scale), "ratio": [round(r, 8) for r in self.ratio],
                "flip": self.flip, "views": self.views, "seed": self.seed, "color_jitter": self.color_jitter,
                "replay": self.replay, **({"decoder": self.decoder} if self.decoder != DECODER_CPU else {})}


REPLAY_ON = ("workers", "device", "device-decode")


def check_replay_on(where: str, impl: str) -> str:
    """Where pixels are made (`--replay-on`): workers (decode and replay), device (workers decode, the model's
    device replays), device-decode (workers only read the bytes; the device decodes JPEGs and replays)."""
    from .errors import ConfigError

    if where not in REPLAY_ON:
        raise ConfigError(f"--replay-on {where!r}: choose {', '.join(REPLAY_ON)}")
    if where != "workers" and check_replay(impl) != REPLAY_TENSOR:
        raise ConfigError(f"--replay-on {where} needs the tensor replay ({REPLAY_TENSOR}); this cache's is {impl}")
    return where


def check_replay(impl: str) -> str:
    if impl not in REPLAYS:
        from .errors import ConfigError

        raise ConfigError(f"unknown view replay {impl!r} (a newer mdcache made this cache?); this one knows "
                          f"{', '.join(REPLAYS)}")
    return impl


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


def _check_size(image: Image.Image, src_h: int, src_w: int) -> None:
    if image.size != (src_w, src_h):
        raise ValueError(f"view was sampled on a {src_w}x{src_h} image but the decoded image is "
                         f"{image.size[0]}x{image.size[1]}: source changed since extraction")


def _replay_pil(image: Image.Image, params, size: int) -> Image.Image:
    top, left, h, w, flip, src_h, src_w, *jitter = (int(v) for v in params)
    _check_size(image, src_h, src_w)
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


def resize_aa(crop, size: int):
    """uint8 [N,3,h,w] -> uint8 [N,3,size,size], antialiased bicubic. On the CPU torch's uint8 kernel (PIL's
    separable fixed-point algorithm, width first, uint8 in between); elsewhere the same in float32 with the
    rounding between the passes, which agrees with it to within 2 levels (on ~0.3% of pixels 1 level)."""
    import torch.nn.functional as F

    if crop.device.type == "cpu":
        return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    return resize_aa_float(crop, size)


def resize_aa_float(crop, size: int):
    """`resize_aa` as a device without torch's uint8 kernel (a GPU) runs it: two float32 passes, rounded to
    uint8 levels in between, as the uint8 kernel keeps them."""
    import torch.nn.functional as F

    x = crop.float()
    x = F.interpolate(x, size=(x.shape[-2], size), mode="bicubic", antialias=True).round_().clamp_(0, 255)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).round_().clamp_(0, 255)
    return x.to(crop.dtype)


@functools.lru_cache(maxsize=8)
def _gray(device) -> "torch.Tensor":  # noqa: F821
    import torch

    return torch.tensor(GRAY, dtype=torch.float32, device=device)


def jitter_(x, factors: tuple[float, float, float], order: int):
    """Brightness, contrast, saturation (torchvision's definitions: blend with black, the mean grey level,
    the grey image; clamped after each) in the stored order, in place on float32 [3,H,W] in 0..255."""
    gray = _gray(x.device)
    for i in JITTER_ORDERS[order]:
        f = factors[i]
        if i == 0:
            x.mul_(f)
        else:  # blend with the grey level (contrast) or the grey image (saturation) of the image as it is now
            grey = gray @ x.reshape(3, -1)
            grey = grey.mean() if i == 1 else grey.reshape(1, *x.shape[1:])
            x.mul_(f).add_(grey * (1 - f))
        x.clamp_(0, 255)
    return x


def _crop_resized(x, params, size: int):
    """One view's crop of an image as uint8 [3,H,W] (any device), resized: uint8 [1,3,size,size]."""
    top, left, h, w, _, src_h, src_w = (int(v) for v in params[:7])
    if tuple(x.shape[1:]) != (src_h, src_w):
        raise ValueError(f"view was sampled on a {src_w}x{src_h} image but the decoded image is "
                         f"{x.shape[2]}x{x.shape[1]}: source changed since extraction")
    return resize_aa(x[None, :, top:top + h, left:left + w], size)


def _replay_tensor(x, params, size: int):
    """One view from an image as uint8 [3,H,W] -> uint8 [3,size,size] (on a CPU; a GPU batches the last steps)."""
    import torch

    view = _crop_resized(x, params, size)[0]
    flip, jitter = int(params[4]), [int(j) for j in params[7:]]
    if flip:
        view = view.flip(-1)
    if jitter and jitter[:3] != [JITTER_SCALE] * 3:
        view = jitter_(view.float(), tuple(j / JITTER_SCALE for j in jitter[:3]), jitter[3]).round_().to(torch.uint8)
    return view


def flip_and_jitter(v, params, flips: bool = True, jitter: bool = True):
    """The flips and colour jitter of views already cropped and resized, uint8 [N,3,S,S] (a GPU's); params
    int [N,11] on the same device; `flips`/`jitter`: whether any view has one (known on the host: nothing is
    read back from the device). A few kernels per batch, whatever N: each step applies to every view either
    its operation or, with factor 1, an exact identity (x*1 + g*0 = x), so no view is picked out. Equal to
    the one-view replay but for the contrast's mean grey level, summed in another order (a level, rarely)."""
    import torch

    if flips:
        v = torch.where(params[:, 4].bool().view(-1, 1, 1, 1), v.flip(-1), v)
    if not jitter:
        return v
    f = params[:, 7:10].float() / JITTER_SCALE
    x, gray = v.float(), _gray(v.device)
    order = _orders(v.device)[params[:, 10].long()]  # [N,3]: each view's operations, in its order
    one = torch.ones_like(f[:, 0])
    for t in range(3):
        for i in (0, 1, 2):
            fi = torch.where(order[:, t] == i, f[:, i], one).view(-1, 1, 1, 1)
            if i == 0:
                x.mul_(fi)
            else:
                grey = torch.matmul(gray, x.reshape(len(x), 3, -1))
                grey = grey.mean(-1).view(-1, 1, 1, 1) if i == 1 else grey.view(len(x), 1, *x.shape[2:])
                x.mul_(fi).add_(grey * (1 - fi))
            x.clamp_(0, 255)
    return x.round_().to(torch.uint8)


@functools.lru_cache(maxsize=8)
def _orders(device) -> "torch.Tensor":  # noqa: F821
    import torch

    return torch.tensor(JITTER_ORDERS, dtype=torch.long, device=device)


def image_tensor(image: Image.Image):
    """A decoded RGB image as uint8 [3,H,W] (a view of the array PIL hands out, not copied again)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # PIL's array is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


def view_pixels(image, params: np.ndarray, size: int, impl: str = REPLAY_IMPL, device=None):
    """The one function that turns (decoded image, stored view params) into the views' pixels: uint8
    [K,3,S,S] for params [K,11] (or [3,S,S] for one view). `image` is a PIL image from `decode_image`, or for
    the tensor replay also its uint8 [3,H,W] tensor; `device` runs the tensor replay there (a GPU)."""
    one = np.ndim(params) == 1
    out = replay_batch([image], [np.asarray(params).reshape(-1, np.shape(params)[-1])], size, impl, device)
    return out[0] if one else out


def replay_batch(images: list, params: list[np.ndarray], size: int, impl: str = REPLAY_IMPL, device=None):
    """`view_pixels` of several images at once: uint8 [sum K_i,3,S,S], image i's views in order. On a CPU view
    by view (each view's float work stays in the core's cache); on a GPU each crop is resized alone (crops
    differ in size, so do their antialiasing filters), then the whole batch is flipped and jittered at once."""
    import torch

    if check_replay(impl) == REPLAY_PIL:
        return torch.cat([torch.stack([image_tensor(_replay_pil(im, p, size)) for p in rows])
                          for im, rows in zip(images, params)])
    xs = [im if isinstance(im, torch.Tensor) else image_tensor(im) for im in images]
    if device is not None:
        xs = [x.to(device, non_blocking=True) for x in xs]
    if not xs:
        return torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
    if xs[0].device.type == "cpu":
        return torch.stack([_replay_tensor(x, p, size) for x, rows in zip(xs, params) for p in rows])
    return _replay_batched(xs, params, size)


def _replay_batched(xs: list, params: list[np.ndarray], size: int):
    """The GPU's form of the tensor replay (runs on any device: the tests run it on a CPU)."""
    import torch

    rows = np.concatenate(params)
    crops = torch.cat([_crop_resized(x, p, size) for x, ps in zip(xs, params) for p in ps])
    jitter = rows.shape[1] > 7 and bool((rows[:, 7:10] != JITTER_SCALE).any())
    return flip_and_jitter(crops, torch.as_tensor(rows, dtype=torch.int64).to(crops.device, non_blocking=True),
                           flips=bool(rows[:, 4].any()), jitter=jitter)


def replay(image: Image.Image, params: np.ndarray | tuple, size: int, impl: str = REPLAY_IMPL) -> Image.Image:
    """One view as a PIL image (for people and PIL-based pipelines); the trainer uses `view_pixels`."""
    if check_replay(impl) == REPLAY_PIL:
        return _replay_pil(image, params, size)
    return Image.fromarray(view_pixels(image, np.asarray(params), size, impl).permute(1, 2, 0).numpy())


@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple, std: tuple, device):
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return m.to(device), s.to(device)


def normalize(images, mean: tuple[float, ...], std: tuple[float, ...]):
    """uint8 [B,3,H,W] -> float32 (x/255 - mean)/std, on the images' device. The constants are made once per
    device (no host-to-device copy per call); teacher and student differ only in mean/std."""
    m, s = _mean_std(tuple(mean), tuple(std), images.device)
    return (images.float().div_(255.0) - m) / s


def to_tensor(view: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]):
    """PIL view -> normalized float32 CHW tensor (`normalize` of its pixels)."""
    return normalize(image_tensor(view)[None], mean, std)[0]


def jpeg_components(data) -> int | None:
    """Colour components of an 8-bit baseline or progressive (Huffman) JPEG from its frame header (1 gray,
    3 YCbCr, 4 CMYK/YCCK): what nvJPEG decodes. None for anything else (not a JPEG, lossless, arithmetic-coded,
    12-bit, or ending before the frame header). Reads the markers only, not the image."""
    b = data if isinstance(data, bytes) else memoryview(data.numpy())  # a tensor's bytes, read in place
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            if marker > 0xC2 or i + 9 >= len(b) or b[i + 4] != 8:  # only SOF0-2 at 8 bits for nvJPEG
                return None
            return b[i + 9]
        i += 2 + int.from_bytes(b[i + 2:i + 4], "big")
    return None


def image_size_of(data: bytes) -> tuple[int, int]:
    """(height, width) from the image's header, without decoding it (views are drawn on the full image)."""
    import io

    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


def encoded_tensor(data: bytes):
    """The image file's bytes as uint8 [N] (what a loader worker ships when the device decodes)."""
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _device_error(e: BaseException) -> bool:
    """A CUDA fault is a RuntimeError too (torch.AcceleratorError; torchvision's nvJPEG path rethrows the
    device's own errors as plain RuntimeErrors, naming them): caught as a file's, it would send every image
    to PIL without a word."""
    import torch

    kinds = (torch.OutOfMemoryError, *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()))
    return isinstance(e, kinds) or any(w in str(e) for w in ("CUDA error", "out of memory", "CUDA_ERROR"))


class ImageDecodeError(ValueError):
    """Image `index` of a batch could not be decoded (the caller names its key)."""

    def __init__(self, index: int, why: str):
        super().__init__(why)
        self.index = index


def decode_batch(datas: list, device, failed: dict[int, str] | None = None, refused: list[int] | None = None) -> list:
    """Encoded images (uint8 [N] each) -> decoded uint8 [3,H,W] on `device`, as `decode_image` decodes them.
    Gray and colour JPEGs are decoded in one batch by torchvision on `device` (nvJPEG on a GPU; on a CPU
    libjpeg-turbo, the decoder PIL uses: the same pixels); PNG, WebP and CMYK JPEGs by PIL, then moved. A file
    the device refuses is decoded by PIL; one PIL cannot decode either is an `ImageDecodeError`, or, given
    `failed`, None in the output and {index: why} there; `refused` collects the indices the device left to PIL.
    The device's own errors (out of memory, a CUDA fault) are raised as they are, never blamed on a file or
    quietly decoded by PIL instead."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list = [None] * len(datas)
    fast = [i for i, d in enumerate(datas) if jpeg_components(d) in (1, 3)]
    if fast:
        try:
            decoded = decode_jpeg([datas[i] for i in fast], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:  # one file the decoder refuses fails the batch: each alone, PIL for the refused
            if _device_error(e):
                raise  # the device's trouble, not a file's
            decoded, first = [], None
            for i in fast:
                try:
                    decoded.append(decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=device))
                except RuntimeError as e:
                    if _device_error(e):
                        raise
                    decoded.append(None)
                    first = first or e
                    if refused is not None:
                        refused.append(i)
            if len(fast) > 1 and all(x is None for x in decoded):  # the decoder is broken, not every file
                raise RuntimeError(f"the {device} JPEG decoder refused all {len(fast)} JPEGs of a batch (the first: "
                                   f"{first}); decode them in the loader workers (--replay-on device)") from first
        for i, x in zip(fast, decoded):
            out[i] = x
    for i, d in enumerate(datas):
        if out[i] is None:  # PNG, WebP, CMYK or 12-bit JPEG, or a file nvJPEG refused: PIL, which names the fault
            try:
                image = decode_image(d.numpy().tobytes())
            except Exception as e:
                why = f"undecodable image: {type(e).__name__}: {e}"
                if failed is None:
                    raise ImageDecodeError(i, why) from None
                failed[i] = why
                continue
            out[i] = image_tensor(image).to(device, non_blocking=True)
    return out


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
        return im if im.mode == "RGB" else im.convert("RGB")  # an RGB image needs no copy
