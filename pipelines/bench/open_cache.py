"""What opening a cache of many shards costs, against a real S3 server on this machine (SeaweedFS).

    python pipelines/bench/open_cache.py [--shards 1000] [--latency-ms 20]

Builds a real one-shard cache in a bucket, then publishes SHARDS commit records for it (records only:
opening a cache reads records, never shard data). It times three ways to open it, in one run:

1. one GET per commit record, one after the other (how mdcache opened caches before the index);
2. no index: one listing, then every record in one concurrent batch of GETs;
3. the compacted index (what `mdcache extract` leaves): one listing and one GET.

Localhost answers in well under a millisecond, which hides what a remote bucket costs, so the
sequential round trips are also priced at --latency-ms each (a latency proxy: requests x latency).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import s3_server  # noqa: E402  (the test suite's SeaweedFS launcher)

from mdcache import open_cache, store  # noqa: E402
from mdcache.fs import read_json, url_to_fs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--latency-ms", type=float, default=20.0, help="round-trip time of a remote bucket to price")
    p.add_argument("--data", default="runs/photos", help="folder with train-000000.tar (pipelines/demo/make_data.py)")
    a = p.parse_args()
    if not Path(a.data, "train-000000.tar").exists():
        subprocess.run([sys.executable, str(ROOT / "pipelines/demo/make_data.py"), "--out", a.data], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = s3_server.start(Path(tmp))
        try:
            run(server, a)
        finally:
            s3_server.stop(server)


def run(server, a: argparse.Namespace) -> None:
    from mdcache.extract import ExtractConfig, extract

    fs, so = server.fs(), server.options()
    fs.put_file(str(Path(a.data, "train-000000.tar")), f"{s3_server.BUCKET}/data/train-000000.tar")
    os.environ.update(server.env())
    url, _ = extract(ExtractConfig(source="s3://team/data/train-000000.tar", cache="s3://team/open",
                                   teacher="timm:vit_tiny_patch16_224", teacher_args={"img_size": 32},
                                   random_init=True, image_size=32, views=1,
                                   codec="fp16", workers=0, batch_size=8, storage_options=so), progress=False)
    cache = open_cache(url, so)
    rec = next(iter(cache.commits.values()))
    _, path = url_to_fs(url, so)
    t0 = time.perf_counter()
    fs.pipe({f"{path}/commits/s{i:06d}.json": json.dumps({**rec, "shard": f"s{i:06d}"}).encode()
             for i in range(a.shards - 1)})
    print(f"published {a.shards - 1} more commit records in {time.perf_counter() - t0:.1f}s")
    fs.rm(f"{path}/{store.COMMIT_INDEX}")

    def timed(fn, repeats: int = 3) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    def sequential():
        sfs, spath = url_to_fs(url, so)
        sfs.invalidate_cache()
        for p in sfs.ls(f"{spath}/commits", detail=False):
            read_json(sfs, p)

    seq = timed(sequential, 1)
    batch = timed(lambda: open_cache(url, so))
    cache = open_cache(url, so)
    assert len(cache.commits) == a.shards and cache.unindexed == a.shards
    cache.write_index()
    indexed = timed(lambda: open_cache(url, so))
    assert open_cache(url, so).unindexed == 0
    lat = a.latency_ms / 1000
    pages = -(-a.shards // 1000)
    rows = [("one GET per record, in sequence", seq, pages + a.shards),
            ("no index: listing + one concurrent batch", batch, None),
            ("compacted index: listing + one GET", indexed, pages + 2)]
    print(f"\nopening a cache of {a.shards} committed shards (local SeaweedFS; best of 3 where repeated)")
    print(f"{'method':<44} {'wall s':>8} {'sequential round trips':>24} {'at ' + str(a.latency_ms) + ' ms':>10}")
    for name, wall, trips in rows:
        priced = f"{trips * lat:.2f}s" if trips else "-"
        print(f"{name:<44} {wall:>8.3f} {trips if trips else '-':>24} {priced:>10}")
    print(f"\nratio sequential/index (wall, here): {seq / indexed:.1f}x; "
          f"at {a.latency_ms} ms per round trip: {(pages + a.shards) / (pages + 2):.0f}x")


if __name__ == "__main__":
    main()
