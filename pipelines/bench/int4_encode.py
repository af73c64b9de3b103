"""int4 encoding speed on one CPU core: the torch encoder and the one-pass numba encoder side by side, in one
run (same features, same calibration), with how many stored bytes differ between the two.

    python pipelines/bench/int4_encode.py [--views 64] [--repeats 3]

Features are CLIP-B/16-shaped (196 tokens x 768 channels) and the study teacher's shape (49 x 128): random
with per-channel spreads and offsets (a few large channels, as CLIP has), since the speed does not depend on
the values. One thread (`torch.set_num_threads(1)`), best of --repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def best_seconds(fn, repeats: int) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import numpy as np
    import torch

    from mdcache import codecs, int4_cpu

    torch.set_num_threads(1)
    if not int4_cpu.available():
        raise SystemExit("numba is not installed (it comes with ffcv): only the torch encoder can run")
    c, rows = codecs.get_codec("int4"), []
    for name, (tokens, dim) in {"CLIP-B/16": (196, 768), "study ViT": (49, 128)}.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(a.views, tokens, dim, generator=g) * torch.rand(dim, generator=g) * 3 + torch.randn(dim,
                                                                                                          generator=g)
        calib = c.calibrate(x[:8].reshape(-1, dim))
        c.encode(x[:1], calib)  # compile (or load the compiled kernel) before timing
        fast_s = best_seconds(lambda x=x, calib=calib: c.encode(x, calib), a.repeats)
        fast = c.encode(x, calib)
        os.environ["MDCACHE_INT4_TORCH"] = "1"
        torch_s = best_seconds(lambda x=x, calib=calib: c.encode(x, calib), max(1, a.repeats - 1))
        slow = c.encode(x, calib)
        del os.environ["MDCACHE_INT4_TORCH"]
        rows.append({"features": name, "views": a.views, "torch_views_per_s": a.views / torch_s,
                     "numba_views_per_s": a.views / fast_s, "speedup": torch_s / fast_s,
                     "codes_differ": float(np.mean(fast["targets"] != slow["targets"])),
                     "scales_differ": float(np.mean(fast["scales"] != slow["scales"]))})
    print("| features | torch views/s/core | one-pass views/s/core | speed-up | code bytes differing | "
          "scales differing |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['features']} | {r['torch_views_per_s']:,.0f} | {r['numba_views_per_s']:,.0f} | "
              f"{r['speedup']:.1f}x | {r['codes_differ']:.1e} | {r['scales_differ']:.1e} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
