"""The unified-view objective: L(H(S(x_masked))[masked], N(T(x))[masked]).

N is the target normalization (`layernorm`: per-token LayerNorm without affine, eps 1e-6, the same
function mdcache uses to measure codec fidelity, so the fidelity report speaks about exactly what
the loss sees). L is Smooth-L1 (MaskDistill), MSE, or cosine distance, on masked tokens only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mdcache.codecs import token_layernorm
from mdcache.errors import ConfigError

TARGET_NORMS = ("layernorm", "none")
LOSSES = ("smooth_l1", "mse", "cosine")


def check(target_norm: str, loss: str) -> None:
    if target_norm not in TARGET_NORMS:
        raise ConfigError(f"--target-norm {target_norm!r}: choose one of {', '.join(TARGET_NORMS)}")
    if loss not in LOSSES:
        raise ConfigError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")


def normalize_targets(targets: torch.Tensor, target_norm: str) -> torch.Tensor:
    """float32 [B,P,D] teacher features -> what the student regresses."""
    if target_norm == "layernorm":
        return token_layernorm(targets)
    if target_norm == "none":
        return targets.float()
    raise ValueError(f"unknown target norm {target_norm!r}")


def masked_feature_loss(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                        target_norm: str = "layernorm", loss: str = "smooth_l1", beta: float = 2.0) -> torch.Tensor:
    """Mean loss over masked tokens. pred/targets [B,P,D] (any float dtype), mask bool [B,P].

    Every token's loss is computed and the masked ones averaged by weight: selecting them (`x[mask]`) has a
    data-dependent shape, which waits for the device on every step. The value is the same."""
    p, t = pred.float(), normalize_targets(targets, target_norm)
    if loss == "smooth_l1":
        per_token = F.smooth_l1_loss(p, t, beta=beta, reduction="none").mean(-1)
    elif loss == "mse":
        per_token = F.mse_loss(p, t, reduction="none").mean(-1)
    elif loss == "cosine":
        per_token = 1.0 - F.cosine_similarity(p, t, dim=-1)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)
