"""The cache as a WebDataset pipeline stage: a user's own loop gets the teacher targets without mdtrain.

    import webdataset as wds
    import mdcache
    from mdcache.wds import with_targets

    cache = mdcache.open_cache("./cache/<cache-id>")
    ds = wds.WebDataset(urls, shardshuffle=False).compose(with_targets(cache, epoch=e)).shuffle(1000)

Each sample gains `mdcache.image` (the stored view replayed on its image: a PIL image of the cache's
image size, exactly what the teacher saw), `mdcache.targets` (float32 [P, D], or the encoded arrays with
decode=False), `mdcache.params` (the view's int32 row) and `mdcache.view`. The view of a shard in an
epoch is the one `mdtrain pretrain` would use (`views.view_for`). webdataset splits shards by node and
worker before this stage; each worker holds one shard's targets (one view) at a time. Put the stage
before any sample shuffle, and give it the image bytes undecoded (or `.decode("pil")`: then the image
is used as decoded, which for unusual files, e.g. 16-bit PNGs, may differ from what the teacher saw).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from . import views
from .errors import CacheError
from .sources import IMAGE_EXTS, check_unchanged, shard_name
from .store import Cache


def with_targets(cache: Cache, epoch: int = 0, view: int | None = None, seed: int = 0,
                 decode: bool = True) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """A stage for `WebDataset(...).compose(stage)`. view=None: the epoch's view of each shard, as mdtrain
    picks it from (seed, shard, epoch); an int: that view everywhere."""
    if view is not None and (isinstance(view, bool) or not isinstance(view, (int, np.integer))
                             or not 0 <= view < cache.views):
        raise CacheError(f"{cache.url}: view={view!r} is not a view index of this cache (an integer from 0 to "
                         f"{cache.views - 1}, or None for the epoch's view)")

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        current, table = None, None
        recorded = {s.name: s for s in cache.sources()}
        for sample in samples:
            shard = shard_name(sample.get("__url__", ""))
            if shard != current:  # one shard's view in memory at a time
                if shard in recorded and sample.get("__url__"):  # its size must be the one the cache recorded
                    try:
                        check_unchanged(replace(recorded[shard], url=sample["__url__"]), cache.storage_options)
                    except (ValueError, ImportError, NotImplementedError, OSError):
                        pass  # a URL fsspec cannot stat (pipe:...): nothing to compare
                current, table = shard, _load(cache, shard, epoch, view, seed)
            key = sample["__key__"]
            row = table["index"].get(key)
            if row is None:
                if key in table["skipped"]:  # undecodable at extraction: the cache has no target for it
                    continue
                raise CacheError(f"{cache.url}: shard {shard!r} has no target for key {key!r} (the source changed "
                                 "since extraction, or these shards are not the cache's source)")
            arrays = {name: a[row] for name, a in table["arrays"].items()}
            out = dict(sample)
            out["mdcache.image"] = views.replay(_image(sample, shard, key), table["params"][row], cache.image_size,
                                                cache.replay)
            out["mdcache.targets"] = (cache.decode({n: torch.from_numpy(a[None]) for n, a in arrays.items()})[0]
                                      if decode else arrays)
            out["mdcache.params"] = table["params"][row]
            out["mdcache.view"] = table["view"]
            yield out

    return stage


def _load(cache: Cache, shard: str, epoch: int, view: int | None, seed: int) -> dict[str, Any]:
    v = view if view is not None else views.view_for(seed, shard, epoch, cache.views)
    keys, arrays, params = cache.read_encoded(shard, v)
    skipped = {s["key"] for s in cache.commits[shard].get("skipped", [])}
    return {"index": {k: i for i, k in enumerate(keys)}, "arrays": arrays, "params": params, "view": v,
            "skipped": skipped}


def _image(sample: dict, shard: str, key: str):
    for ext in IMAGE_EXTS:
        if ext in sample:
            x = sample[ext]
            if isinstance(x, (bytes, bytearray)):
                return views.decode_image(bytes(x))
            if hasattr(x, "convert"):  # decoded by webdataset to PIL
                return x.convert("RGB")
            if isinstance(x, np.ndarray):
                from PIL import Image
                return Image.fromarray(x if x.dtype == np.uint8 else (255 * x).clip(0, 255).astype(np.uint8))
    raise CacheError(f"shard {shard!r} key {key!r}: no image member ({', '.join(IMAGE_EXTS)}) in the sample")
