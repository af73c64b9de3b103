"""Target codecs: how teacher features are stored, and how faithfully.

fp16 is the reference. int8 first removes each channel's mean and divides by its spread
(calibrated once per cache, stored in the manifest), then quantizes each token with its own
scale. CLIP features have a few huge-magnitude channels; one scale per token without the
per-channel step would spend all 8 bits on them and flatten every other channel.

int4 keeps int8's per-channel step but has only 16 values per number, so it spends them where the
numbers are: 16 levels fitted to the calibration tokens (Lloyd-Max), a per-token scale the encoder
picks to minimise the token's error in feature units, and two codes per byte. pca:R keeps R
coefficients per token in a per-cache basis fitted to the layer-normalised calibration tokens (the
space MaskDistill regresses in), as int8 with a per-token scale; the token's own mean and spread
(what LayerNorm removes) ride along in fp16 so that decoding still returns features.

Encoding runs on the extractor's device; decoding is plain torch so the trainer can run it
on the accelerator ("dequantize late"). A calibration may hold numpy arrays (pca's basis): the
store keeps them as arrays beside the manifest, and they reach decode as tensors on its device.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .errors import ConfigError
from .lazy import lazy

torch, F = lazy("torch"), lazy("torch.nn.functional")

LN_EPS = 1e-6


@dataclass(frozen=True)
class Codec:
    """One codec, whole: its arrays, its fingerprint, and its three functions. A new codec is one CODECS entry."""

    name: str
    arrays: Callable[[int], dict[str, tuple[str, int | None]]]  # D -> {array: (numpy dtype, width)}: [N, P, width],
    #                                                             or [N, P] when width is None
    identity: dict  # name + parameters, for the cache fingerprint (changing it changes every cache id)
    calibrate: Callable[[torch.Tensor], dict] | None  # sample tokens [..., D] -> stats (JSON, or numpy arrays)
    encode: Callable[[torch.Tensor, dict | None], dict[str, np.ndarray]]  # float [N, P, D] -> arrays
    decode: Callable[[dict[str, torch.Tensor], dict | None], torch.Tensor]  # arrays (any device) -> float32

    def shapes(self, tokens: int, dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Per-sample array shapes for a teacher with `tokens` patches of `dim` channels."""
        return {n: (dt, (tokens,) if w is None else (tokens, w)) for n, (dt, w) in self.arrays(dim).items()}

    def bytes_per_token(self, dim: int) -> int:
        """Stored bytes per token before compression: what `mdcache plan` multiplies out."""
        return sum(np.dtype(dt).itemsize * (1 if w is None else w) for dt, w in self.arrays(dim).values())


def _t(calib: dict, key: str, device) -> torch.Tensor:
    """A calibration entry as a float32 tensor on `device` (a no-op when the store already put it there)."""
    return torch.as_tensor(calib[key], device=device, dtype=torch.float32)


def _mean_std(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and spread (floored relative to the largest magnitude, so no channel divides by 0)."""
    tokens = tokens.float().reshape(-1, tokens.shape[-1])
    return tokens.mean(0), tokens.std(0).clamp_min(1e-6 * float(tokens.abs().max().clamp_min(1e-12)))


def _fp16_encode(x: torch.Tensor, calib: dict | None) -> dict[str, np.ndarray]:
    return {"targets": x.float().half().cpu().numpy()}


def _fp16_decode(arrays: dict[str, torch.Tensor], calib: dict | None) -> torch.Tensor:
    return arrays["targets"].float()


def _int8_calibrate(tokens: torch.Tensor) -> dict:
    mean, std = _mean_std(tokens)
    return {"mean": mean.tolist(), "std": std.tolist()}


def _int8_encode(x: torch.Tensor, calib: dict | None) -> dict[str, np.ndarray]:
    y = (x.float() - _t(calib, "mean", x.device)) / _t(calib, "std", x.device)
    scale = y.abs().amax(-1).clamp_min(1e-12) / 127.0
    q = torch.round(y / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return {"targets": q.cpu().numpy(), "scales": scale.cpu().numpy().astype(np.float32)}


def _int8_decode(arrays: dict[str, torch.Tensor], calib: dict | None) -> torch.Tensor:
    t = arrays["targets"]
    y = t.float() * arrays["scales"].float().unsqueeze(-1)
    return y * _t(calib, "std", t.device) + _t(calib, "mean", t.device)


# ----------------------------------------------------------------------------- int4

FP16_MIN, FP16_MAX = 6.2e-5, 65504.0  # per-token scalars are stored in fp16: keep them normal and finite
INT4_LEVELS = 16
INT4_SCALES = (0.8, 1.0, 1.25)  # multiples of the token's rms the encoder tries (more buy little)
_LLOYD_SAMPLE = 2_000_000                                # calibration values the levels are fitted on (at most)


def lloyd_levels(z: torch.Tensor, n: int = INT4_LEVELS, iters: int = 40) -> torch.Tensor:
    """The n reconstruction levels with least squared error on samples z (Lloyd-Max), started at a
    normal's quantiles so the result depends on the data only: every extractor derives the same levels."""
    z = z.double().reshape(-1)
    z = z[:: max(1, math.ceil(z.numel() / _LLOYD_SAMPLE))].contiguous()
    levels = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64))
    for _ in range(iters):
        idx = torch.bucketize(z, (levels[1:] + levels[:-1]) / 2)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, z)
        counts = torch.bincount(idx, minlength=n).double()
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels)
    return levels.float()


def _rms(y: torch.Tensor) -> torch.Tensor:
    return y.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


def _int4_calibrate(tokens: torch.Tensor) -> dict:
    mean, std = _mean_std(tokens)
    y = (tokens.float().reshape(-1, tokens.shape[-1]) - mean) / std
    return {"mean": mean.tolist(), "std": std.tolist(), "levels": lloyd_levels(y / _rms(y)).tolist()}


def _int4_arrays(d: int) -> dict[str, tuple[str, int | None]]:
    if d % 2:
        raise ConfigError(f"int4 packs two channels per byte: the teacher's {d} channels are odd; use int8")
    return {"targets": ("uint8", d // 2), "scales": ("float16", None)}


def _int4_encode(x: torch.Tensor, calib: dict | None) -> dict[str, np.ndarray]:
    if x.device.type == "cpu" and os.environ.get("MDCACHE_INT4_TORCH") != "1":
        from . import int4_cpu  # one pass per token instead of a dozen: 16-28x on a CPU, same codes (tested)

        if int4_cpu.available():
            try:
                return int4_cpu.encode(x.float().numpy(), *(np.asarray(calib[k], np.float32) for k in
                                                            ("mean", "std", "levels")), INT4_SCALES, FP16_MIN, FP16_MAX)
            except int4_cpu.GridTooCoarse:
                pass  # levels too close for its lookup table: the torch encoder below
    std = _t(calib, "std", x.device)
    levels = _t(calib, "levels", x.device)
    bounds = (levels[1:] + levels[:-1]) / 2
    y = (x.float() - _t(calib, "mean", x.device)) / std
    rms, w = _rms(y), std.square()
    best_err = best_codes = best_scale = None
    for m in INT4_SCALES:  # the scale with the least error in feature units (after * std), per token
        scale = (rms * m).clamp(FP16_MIN, FP16_MAX).half().float()  # as stored
        codes = torch.bucketize(y / scale, bounds, out_int32=True)
        err = ((levels[codes] * scale - y).square() * w).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_codes, best_scale = err, codes.to(torch.uint8), scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_codes = torch.where(better, codes.to(torch.uint8), best_codes)
            best_scale = torch.where(better, scale, best_scale)
    packed = best_codes[..., 0::2] | (best_codes[..., 1::2] << 4)  # channel 2i in the low nibble, 2i+1 in the high one
    return {"targets": packed.cpu().numpy(), "scales": best_scale.squeeze(-1).half().cpu().numpy()}


def _int4_decode(arrays: dict[str, torch.Tensor], calib: dict | None) -> torch.Tensor:
    p = arrays["targets"]
    codes = torch.stack((p & 15, p >> 4), -1).flatten(-2).long()
    levels = _t(calib, "levels", p.device)
    y = levels[codes] * arrays["scales"].float().unsqueeze(-1)
    return y * _t(calib, "std", p.device) + _t(calib, "mean", p.device)


# ----------------------------------------------------------------------------- pca:R

def token_layernorm(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """The target normalization MaskDistill applies: per-token LayerNorm, no affine."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


EV_POINTS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def _pca_calibrate(r: int) -> Callable[[torch.Tensor], dict]:
    def calibrate(tokens: torch.Tensor) -> dict:
        d = tokens.shape[-1]
        t = token_layernorm(tokens).reshape(-1, d).double()
        mean = t.mean(0)
        var, vecs = torch.linalg.eigh((t - mean).T @ (t - mean) / max(len(t) - 1, 1))
        var, vecs = var.flip(0).clamp_min(0), vecs.flip(1)          # largest first
        vecs = vecs * torch.sign(vecs[vecs.abs().argmax(0), torch.arange(d)])  # a sign convention: deterministic
        ev = var.cumsum(0) / var.sum().clamp_min(1e-30)
        spread = var[:r].sqrt().clamp_min(1e-6 * float(var[0].sqrt().clamp_min(1e-12)))  # rank-deficient: no 1/0
        return {"mean": mean.float().tolist(), "component_std": spread.float().tolist(),
                "explained_variance": float(ev[r - 1]),
                "explained_variance_curve": {str(k): float(ev[k - 1]) for k in sorted({*EV_POINTS, r}) if k <= d},
                "basis": vecs[:, :r].T.float().numpy()}  # [R, D]
    return calibrate


def _pca_encode(x: torch.Tensor, calib: dict | None) -> dict[str, np.ndarray]:
    x = x.float()
    mu, sigma = x.mean(-1), (x.var(-1, unbiased=False) + LN_EPS).sqrt()
    c = (token_layernorm(x) - _t(calib, "mean", x.device)) @ _t(calib, "basis", x.device).T
    c = c / _t(calib, "component_std", x.device)
    scale = (c.abs().amax(-1) / 127.0).clamp(FP16_MIN, FP16_MAX).half().float()  # as stored
    q = torch.round(c / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    token = torch.stack((scale, mu, sigma), -1).clamp(-FP16_MAX, FP16_MAX).half()
    return {"targets": q.cpu().numpy(), "token": token.cpu().numpy()}


def _pca_decode(arrays: dict[str, torch.Tensor], calib: dict | None) -> torch.Tensor:
    q, token = arrays["targets"], arrays["token"].float()
    c = q.float() * token[..., :1] * _t(calib, "component_std", q.device)
    return (c @ _t(calib, "basis", q.device) + _t(calib, "mean", q.device)) * token[..., 2:3] + token[..., 1:2]


def pca_codec(r: int) -> Codec:
    def arrays(d: int) -> dict[str, tuple[str, int | None]]:
        if not 0 < r < d:
            raise ConfigError(f"pca:{r}: the component count must be between 1 and {d - 1} (the teacher has {d} "
                              "channels)")
        return {"targets": ("int8", r), "token": ("float16", 3)}

    return Codec(f"pca:{r}", arrays,
                 {"name": "pca", "components": r, "space": "token-layernorm", "coefficients": "int8-absmax"},
                 _pca_calibrate(r), _pca_encode, _pca_decode)


CODECS = {c.name: c for c in (
    Codec("fp16", lambda d: {"targets": ("float16", d)}, {"name": "fp16"}, None, _fp16_encode, _fp16_decode),
    Codec("int8", lambda d: {"targets": ("int8", d), "scales": ("float32", None)},
          {"name": "int8", "channel_calibration": "mean-std", "token_scale": "absmax", "qmax": 127},
          _int8_calibrate, _int8_encode, _int8_decode),
    Codec("int4", _int4_arrays,
          {"name": "int4", "channel_calibration": "mean-std", "levels": "lloyd-max-16", "token_scale": "rms-search",
           "packing": "low-nibble-first"},
          _int4_calibrate, _int4_encode, _int4_decode),
)}
FAMILIES = {"pca": pca_codec}  # parametric codecs: NAME:PARAM


def calibrate_on(name: str, batches: Iterable[tuple[int, torch.Tensor]], images: int,
                 nothing: Callable[[], Exception]) -> dict | None:
    """A codec's calibration from feature batches (images in the batch, features [..., D]) taken in order until
    `images` images: deterministic, so every extractor or transcoder of a cache derives the same numbers.
    None for codecs without one; `nothing()` is raised when no batch came."""
    codec = get_codec(name)
    if codec.calibrate is None:
        return None
    feats, n = [], 0
    for count, f in batches:
        feats.append(f.cpu())
        n += count
        if n >= images:
            break
    if not feats:
        raise nothing()
    return codec.calibrate(torch.cat(feats))


@functools.lru_cache(maxsize=None)
def get_codec(name: str) -> Codec:
    """The codec a name gives, made once (it is looked up on every read and decode)."""
    if name in CODECS:
        return CODECS[name]
    family, _, param = name.partition(":")
    if family in FAMILIES:
        if not re.fullmatch(r"[1-9][0-9]*", param):
            raise ConfigError(f"codec {name!r}: say how many components, e.g. {family}:192")
        return FAMILIES[family](int(param))
    raise ConfigError(f"unknown codec {name!r}; choose one of {', '.join([*CODECS, *(f + ':R' for f in FAMILIES)])}")


class FidelityMeter:
    """Cosine similarity and relative L2 per token, after token_layernorm, against fp32 reference."""

    def __init__(self) -> None:
        self.tokens = 0
        self.sum_cos = 0.0
        self.min_cos = float("inf")
        self.sum_rel = 0.0
        self.max_rel = 0.0

    def update(self, reference: torch.Tensor, approx: torch.Tensor) -> None:
        r = token_layernorm(reference).reshape(-1, reference.shape[-1])
        a = token_layernorm(approx.to(reference.device)).reshape(-1, reference.shape[-1])
        cos = F.cosine_similarity(r, a, dim=-1)
        rel = (r - a).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-12)
        self.tokens += r.shape[0]
        self.sum_cos += float(cos.double().sum())
        self.min_cos = min(self.min_cos, float(cos.min()))
        self.sum_rel += float(rel.double().sum())
        self.max_rel = max(self.max_rel, float(rel.max()))

    def merge(self, report: dict) -> None:
        """Fold in a report() from another meter (e.g. another shard)."""
        if not report or not report.get("tokens"):
            return
        n = report["tokens"]
        self.tokens += n
        self.sum_cos += report["mean_cosine"] * n
        self.min_cos = min(self.min_cos, report["min_cosine"])
        self.sum_rel += report["mean_rel_l2"] * n
        self.max_rel = max(self.max_rel, report["max_rel_l2"])

    def report(self) -> dict:
        if not self.tokens:
            return {}
        return {"tokens": self.tokens, "mean_cosine": self.sum_cos / self.tokens, "min_cosine": self.min_cos,
                "mean_rel_l2": self.sum_rel / self.tokens, "max_rel_l2": self.max_rel}
