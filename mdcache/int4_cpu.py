"""int4 encoding on a CPU in one pass per token and candidate scale (numba), when numba is installed (it
comes with ffcv).

The torch encoder (`codecs._int4_encode`) makes about a dozen passes over the features for each of the three
candidate scales, and its `bucketize` alone takes 60% of the time: 40-60 CLIP-B/16 views/s per core. This one
standardizes a token into a buffer that stays in L1, then for each candidate scale finds every code with one
multiply-add into a lookup table over a fine uniform grid (16 KB: it stays in L1 too). A grid cell that holds
a level boundary (or lies within a thousandth of a cell of one) is flagged, and only there is the value
compared with the boundary, as `torch.bucketize` does; the scale with the least error wins. The same
algorithm, the same stored format, the same codes but for ties at the last ulp (see FAST; tested). Features
with NaN or inf, and levels closer than a cell, go to the torch encoder.
"""
from __future__ import annotations

import numpy as np

GRID = 16384   # cells of the code lookup table: far finer than the narrowest gap between level boundaries
BOUNDARY = 128  # flag on a cell's code: a level boundary lies inside the cell

try:
    import numba
except ImportError:  # pragma: no cover - numba comes with ffcv; without it the torch encoder runs
    numba = None


class GridTooCoarse(ValueError):
    """Features this kernel does not take (levels closer than a table cell, NaN or inf): the torch encoder
    takes them (`codecs._int4_encode` falls back to it)."""


def available() -> bool:
    return numba is not None


def lookup(bounds: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(lo, cells per unit, uint8 code of each cell, + BOUNDARY where a boundary lies inside the cell or within
    a thousandth of a cell of it: a value that rounding puts in the next cell is compared there too)."""
    lo, hi = float(bounds[0]) - 1.0, float(bounds[-1]) + 1.0
    inv = GRID / (hi - lo)
    cells = np.arange(GRID, dtype=np.float64)
    margin = 1e-3 / inv
    # np.searchsorted(side="left") is torch.bucketize(right=False): the number of boundaries below the value
    left = np.searchsorted(bounds, lo + cells / inv - margin, side="left")
    right = np.searchsorted(bounds, lo + (cells + 1) / inv + margin, side="left")
    if np.any(right - left > 1):
        raise GridTooCoarse("int4 levels closer than a lookup cell: the torch encoder takes these")
    return lo, inv, (left + BOUNDARY * (right != left)).astype(np.uint8)


# Fast math: sums reordered, divisions by a reciprocal. A value within an ulp of a level boundary may take the
# neighbouring code, as rare as the rms fp16 ties that reordered sums give anyway (measured on CLIP-B/16-shaped
# features: 0 code bytes of 9.6 million differ, 8e-5 of the scales). No NaN or inf may reach the kernels
# (fast math assumes none): `encode` leaves such features to the torch encoder.
FAST = True

if numba is not None:
    @numba.njit(cache=True, nogil=True, fastmath=FAST)
    def _rms(x, mean, rstd, rms):  # pragma: no cover (compiled)
        t_count, d = x.shape
        for t in range(t_count):
            ss = np.float32(0.0)
            for j in range(d):
                v = (x[t, j] - mean[j]) * rstd[j]
                ss += v * v
            rms[t] = max(np.sqrt(ss / d), np.float32(1e-12))

    @numba.njit(cache=True, nogil=True, fastmath=FAST)
    def _codes(x, mean, rstd, w, cand, levels, bounds, lo, inv, lut, codes, chosen):  # pragma: no cover (compiled)
        t_count, d = x.shape
        n_cand = cand.shape[1]
        y = np.empty(d, np.float32)
        trial = np.empty((n_cand, d), np.uint8)
        offset = np.float32(-lo * inv)
        for t in range(t_count):
            for j in range(d):
                y[j] = (x[t, j] - mean[j]) * rstd[j]
            best_err, best = np.float32(np.inf), 0
            for i in range(n_cand):
                s = cand[t, i]
                a = np.float32(inv / s)
                err = np.float32(0.0)
                for j in range(d):
                    f = min(max(y[j] * a + offset, np.float32(0.0)), np.float32(GRID - 1))  # clamped before int
                    c = lut[np.int32(f)]
                    if c >= BOUNDARY:  # a boundary inside this cell: compare with it, as bucketize does
                        c -= BOUNDARY
                        if y[j] / s > bounds[c]:
                            c += 1
                    trial[i, j] = c
                    e = levels[c] * s - y[j]
                    err += e * e * w[j]
                if err < best_err:
                    best_err, best = err, i
            chosen[t] = cand[t, best]
            for j in range(0, d, 2):
                codes[t, j // 2] = trial[best, j] | (trial[best, j + 1] << 4)


def encode(x: np.ndarray, mean: np.ndarray, std: np.ndarray, levels: np.ndarray, mults: tuple[float, ...],
           fp16_min: float, fp16_max: float) -> dict[str, np.ndarray]:
    """float32 features [N, P, D] -> {"targets": uint8 [N, P, D/2], "scales": float16 [N, P]}."""
    n, p, d = x.shape
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, d)
    if not np.isfinite(flat).all():
        raise GridTooCoarse("NaN or inf in the features: the torch encoder takes them")
    mean, std, levels = mean.astype(np.float32), std.astype(np.float32), levels.astype(np.float32)
    rstd = (1.0 / std).astype(np.float32)
    rms = np.empty(flat.shape[0], np.float32)
    _rms(flat, mean, rstd, rms)
    # the candidate scales as stored (fp16), per token: rounded here, where numpy has float16
    cand = np.clip(rms[:, None] * np.asarray(mults, np.float32)[None], fp16_min, fp16_max)
    cand = cand.astype(np.float16).astype(np.float32)
    bounds = ((levels[1:] + levels[:-1]) / 2).astype(np.float32)
    lo, inv, lut = lookup(bounds)
    codes, chosen = np.empty((flat.shape[0], d // 2), np.uint8), np.empty(flat.shape[0], np.float32)
    _codes(flat, mean, rstd, std ** 2, cand, levels, np.append(bounds, np.float32(np.inf)), np.float32(lo),
           np.float32(inv), lut, codes, chosen)
    return {"targets": codes.reshape(n, p, d // 2), "scales": chosen.astype(np.float16).reshape(n, p)}
