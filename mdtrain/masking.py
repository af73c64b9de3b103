"""BEiT block-wise masking, made exact: every mask has exactly `num_masked` patches.

BEiT's generator drops rectangles of at least `min_patches` patches with a log-uniform aspect
ratio until the budget is used; it can stop short when no rectangle fits the remainder. We top up
with random single patches so the count is exact (the loss then averages over the same number of
tokens in every image). Randomness comes from a numpy Generator the caller seeds, so a mask is a
pure function of (seed, epoch, sample key) and survives worker counts and resumes.
"""
from __future__ import annotations

import math

import numpy as np

from mdcache.errors import ConfigError

DEFAULT_MASK_RATIO = 75 / 196      # MaskDistill/BEiT: 75 of 196 patches for ViT-B/16 at 224 px
DEFAULT_MIN_PATCHES = 16           # ... with blocks of at least 16 patches on the 14x14 grid
REFERENCE_PATCHES = 196


def scaled_min_patches(num_patches: int, min_patches: int = DEFAULT_MIN_PATCHES) -> int:
    """Keep the block size a constant *fraction* of the grid: 16 of 196 -> 1 of 16 on a 4x4 grid."""
    return max(1, round(min_patches * num_patches / REFERENCE_PATCHES))


class BlockMasker:
    """Callable: rng -> bool mask [H, W] with exactly `num_masked` True entries."""

    def __init__(self, grid: tuple[int, int], mask_ratio: float = DEFAULT_MASK_RATIO,
                 min_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = int(grid[0]), int(grid[1])
        total = self.height * self.width
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask ratio must be in (0, 1), got {mask_ratio}")
        self.num_masked = max(1, min(total - 1, round(mask_ratio * total)))
        self.min_patches = scaled_min_patches(total) if min_patches is None else int(min_patches)
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"BlockMasker({self.height}x{self.width}, masked={self.num_masked}, "
                f"min_patches={self.min_patches})")

    def _block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try (10 times) to mask one new rectangle adding between 1 and `budget` patches."""
        for _ in range(10):
            area = rng.uniform(self.min_patches, max(self.min_patches, budget))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._block(mask, self.num_masked - count, rng)
            if added == 0:
                break
            count += added
        if count < self.num_masked:  # no rectangle fits the remainder: finish with single patches
            free = np.flatnonzero(~mask.reshape(-1))
            mask.reshape(-1)[rng.choice(free, self.num_masked - count, replace=False)] = True
        return mask
