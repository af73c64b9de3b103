"""What opening a cache of many shards costs, against a real S3 server on this machine (SeaweedFS) behind a
small proxy that adds latency to every request, as a remote bucket would.

    python pipelines/bench/open_cache.py [--shards 64,256,1024] [--latency-ms 30]

For each shard count it publishes that many commit records for one real cache (records only: opening a
cache never reads shard data), then opens it three ways, counting the requests the proxy sees:

1. one GET per commit record, one after the other (how mdcache opened caches before the index);
2. no index: one listing, then every record in one concurrent batch of GETs;
3. the compacted index (what `mdcache extract` leaves): one listing and one GET.

It also times `mdcache ls` of a root holding 20 such caches (the largest shard count).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import s3_server  # noqa: E402  (the test suite's SeaweedFS launcher)

from mdcache import open_cache, store  # noqa: E402
from mdcache.fs import read_json, url_to_fs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from s3_local import local_s3  # noqa: E402  (photo set + SeaweedFS, shared by the S3 benchmarks)


class LatencyProxy:
    """TCP proxy to the S3 server that holds each client request back by `latency` seconds."""

    def __init__(self, upstream_port: int, latency: float):
        self.upstream, self.latency, self.requests = upstream_port, latency, 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pipe(src, dst, delay: bool) -> None:
            try:
                while data := await src.read(65536):
                    if delay and data[:4] in (b"GET ", b"PUT ", b"HEAD", b"POST", b"DELE"):
                        self.requests += 1
                        await asyncio.sleep(self.latency)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="64,256,1024")
    p.add_argument("--latency-ms", type=float, default=30.0)
    p.add_argument("--caches", type=int, default=20, help="caches under the root timed with `mdcache ls`")
    p.add_argument("--ls-shards", type=int, default=256, help="shards of each cache listed by `mdcache ls`")
    p.add_argument("--data", default="runs/photos", help="folder with train-000000.tar (pipelines/demo/make_data.py)")
    a = p.parse_args()
    with local_s3(a.data) as server:
        run(server, a)


def run(server, a: argparse.Namespace) -> None:
    from mdcache.extract import ExtractConfig, extract

    direct = server.options()
    fs = server.fs()
    fs.put_file(str(Path(a.data, "train-000000.tar")), f"{s3_server.BUCKET}/data/train-000000.tar")
    url, _ = extract(ExtractConfig(source="s3://team/data/train-000000.tar", cache="s3://team/open",
                                   teacher="timm:vit_tiny_patch16_224", teacher_args={"img_size": 32},
                                   random_init=True, image_size=32, views=1, codec="fp16", workers=0,
                                   batch_size=8, storage_options=direct), progress=False)
    record = next(iter(open_cache(url, direct).commits.values()))
    _, path = url_to_fs(url, direct)
    proxy = LatencyProxy(int(server.endpoint.rsplit(":", 1)[1]), a.latency_ms / 1000)
    slow = {**direct, "endpoint_url": f"http://127.0.0.1:{proxy.port}"}

    def measure(fn) -> tuple[float, int]:
        proxy.requests = 0
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, proxy.requests

    def sequential() -> None:
        sfs, spath = url_to_fs(url, slow)
        sfs.invalidate_cache()
        for rec in sfs.ls(f"{spath}/commits", detail=False):
            read_json(sfs, rec)

    rows, have = [], 1
    for n in [int(x) for x in a.shards.split(",")]:
        fs.pipe({f"{path}/commits/s{i:06d}.json": json.dumps({**record, "shard": f"s{i:06d}"}).encode()
                 for i in range(have - 1, n - 1)})
        have = n
        if fs.exists(f"{path}/{store.COMMIT_INDEX}"):
            fs.rm(f"{path}/{store.COMMIT_INDEX}")
        seq = measure(sequential)
        batch = measure(lambda: open_cache(url, slow))
        cache = open_cache(url, direct)
        assert len(cache.commits) == n, (len(cache.commits), n)
        cache.write_index()
        indexed = measure(lambda: open_cache(url, slow))
        rows.append((n, seq, batch, indexed))
        print(f"{n} shards done", flush=True)

    print(f"\nopening a cache, {a.latency_ms:.0f} ms added to every request (local SeaweedFS behind a proxy)")
    print(f"{'shards':>7} | {'one GET per record':>22} | {'listing + concurrent GETs':>26} | {'compacted index':>19}")
    for n, (t1, r1), (t2, r2), (t3, r3) in rows:
        print(f"{n:>7} | {t1:>8.2f} s {r1:>6} req | {t2:>11.2f} s {r2:>6} req | {t3:>6.2f} s {r3:>6} req")

    # `mdcache ls` of a root with many caches: the same manifest, records and index under other ids
    root, m = "s3://team/many", a.ls_shards
    _, rpath = url_to_fs(root, direct)
    manifest, index = fs.cat_file(f"{path}/manifest.json"), json.loads(fs.cat_file(f"{path}/{store.COMMIT_INDEX}"))
    for i in range(a.caches):
        dst = f"{rpath}/{i:016x}"
        records = {f"{dst}/commits/s{j:06d}.json": json.dumps({**record, "shard": f"s{j:06d}"}).encode()
                   for j in range(m)}
        fs.pipe({f"{dst}/manifest.json": manifest, **records})
        stamps = {p["name"].rsplit("/", 1)[-1][:-5]: store._stamp(p) for p in fs.ls(f"{dst}/commits", detail=True)}
        fs.pipe_file(f"{dst}/{store.COMMIT_INDEX}", json.dumps({**index, "records": {
            n: {"stamp": stamps[n], "record": {**record, "shard": n}} for n in stamps}}).encode())
    env = {**os.environ, "AWS_ACCESS_KEY_ID": direct["key"], "AWS_SECRET_ACCESS_KEY": direct["secret"],
           "AWS_ENDPOINT_URL": slow["endpoint_url"], "COLUMNS": "200"}
    t, r = measure(lambda: subprocess.run([sys.executable, "-m", "mdcache", "ls", root], env=env, check=True,
                                          capture_output=True))
    with tempfile.TemporaryDirectory() as empty:  # the same command's start-up alone
        t0, _ = measure(lambda: subprocess.run([sys.executable, "-m", "mdcache", "ls", empty], check=True,
                                               capture_output=True))
    print(f"\n`mdcache ls` of a root with {a.caches} caches of {m} shards each: {t:.2f} s, of which {t0:.2f} s is "
          f"the process start-up (`mdcache ls` of an empty folder): {t - t0:.2f} s for {r} requests")


if __name__ == "__main__":
    main()
