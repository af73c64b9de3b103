"""Target codecs: how teacher features are stored, and how faithfully.

fp16 is the reference. int8 first removes each channel's mean and divides by its spread
(calibrated once per cache, stored in the manifest), then quantizes each token with its own
scale. CLIP features have a few huge-magnitude channels; one scale per token without the
per-channel step would spend all 8 bits on them and flatten every other channel.

Encoding runs on the extractor's device; decoding is plain torch so the trainer can run it
on the accelerator ("dequantize late").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError


@dataclass(frozen=True)
class Codec:
    """One codec, whole: its arrays, its fingerprint, and its three functions. A new codec is one CODECS entry."""

    name: str
    arrays: dict[str, tuple[str, int]]  # array -> (numpy dtype, rank); rank 3 = [N, P, D], rank 2 = [N, P]
    identity: dict  # name + parameters, for the cache fingerprint (changing it changes every cache id)
    calibrate: Callable[[torch.Tensor], dict] | None  # sample tokens [M, D] -> JSON stats; None: needs none
    encode: Callable[[torch.Tensor, dict | None], dict[str, np.ndarray]]  # float [N, P, D] -> arrays
    decode: Callable[[dict[str, torch.Tensor], dict | None], torch.Tensor]  # arrays (any device) -> float32


def _fp16_encode(x: torch.Tensor, calib: dict | None) -> dict[str, np.ndarray]:
    return {"targets": x.float().half().cpu().numpy()}


def _fp16_decode(arrays: dict[str, torch.Tensor], calib: dict | None) -> torch.Tensor:
    return arrays["targets"].float()


def _int8_calibrate(tokens: torch.Tensor) -> dict:
    """Per-channel mean and spread (floored relative to the largest magnitude, so no channel divides by 0)."""
    tokens = tokens.float().reshape(-1, tokens.shape[-1])
    mean = tokens.mean(0)
    std = tokens.std(0).clamp_min(1e-6 * float(tokens.abs().max().clamp_min(1e-12)))
    return {"mean": mean.tolist(), "std": std.tolist()}


def _calib_tensors(calib: dict, device, dtype=torch.float32):
    return (torch.tensor(calib["mean"], device=device, dtype=dtype),
            torch.tensor(calib["std"], device=device, dtype=dtype))


def _int8_encode(x: torch.Tensor, calib: dict | None) -> dict[str, np.ndarray]:
    mean, std = _calib_tensors(calib, x.device)
    y = (x.float() - mean) / std
    scale = y.abs().amax(-1).clamp_min(1e-12) / 127.0
    q = torch.round(y / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return {"targets": q.cpu().numpy(), "scales": scale.cpu().numpy().astype(np.float32)}


def _int8_decode(arrays: dict[str, torch.Tensor], calib: dict | None) -> torch.Tensor:
    t = arrays["targets"]
    mean, std = _calib_tensors(calib, t.device)
    return (t.float() * arrays["scales"].float().unsqueeze(-1)) * std + mean


CODECS = {c.name: c for c in (
    Codec("fp16", {"targets": ("float16", 3)}, {"name": "fp16"}, None, _fp16_encode, _fp16_decode),
    Codec("int8", {"targets": ("int8", 3), "scales": ("float32", 2)},
          {"name": "int8", "channel_calibration": "mean-std", "token_scale": "absmax", "qmax": 127},
          _int8_calibrate, _int8_encode, _int8_decode),
)}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]


def token_layernorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The target normalization MaskDistill applies: per-token LayerNorm, no affine."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


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
