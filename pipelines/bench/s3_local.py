"""Issue-5 benchmarks against a real S3 server on this machine (SeaweedFS, as the tests use):

    python pipelines/bench/s3_local.py [--data runs/photos]

1. `mdcache bench --root s3://...`: extraction into the bucket; prints the share of shard time spent
   on claims and commit records (target < 2%).
2. `mdtrain bench-storage`: the trainer's loader reading that cache from the bucket, directly and
   through a cold and a warm --local-cache, vs a local-disk copy (target warm >= 0.8x local).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import s3_server  # noqa: E402  (the test suite's SeaweedFS launcher)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/photos",
                   help="folder with train-00000N.tar (pipelines/demo/make_data.py)")
    p.add_argument("--teacher", default="clip-b16")
    p.add_argument("--image-size", default="224")
    a = p.parse_args()
    with local_s3(a.data) as server:
        fs = server.fs()
        for f in sorted(Path(a.data).glob("train-*.tar")):
            fs.put_file(str(f), f"{s3_server.BUCKET}/data/{f.name}")
        env = {**os.environ, **server.env()}
        source = "s3://team/data/train-{000000..000003}.tar"
        subprocess.run([sys.executable, "-m", "mdcache", "bench", "--teacher", a.teacher, "--random-init",
                        "--image-size", a.image_size, "--source", source, "--root", "s3://team/bench",
                        "--batch-size", "16", "--workers", "1", "--calib-images", "8"], env=env, check=True)
        url = "s3://team/bench/" + fs.ls("team/bench")[0].rsplit("/", 1)[-1]
        subprocess.run([sys.executable, "-m", "mdtrain", "bench-storage", "--cache", url, "--batch-size", "16",
                        "--workers", "1"], env=env, check=True)


@contextlib.contextmanager
def local_s3(data: str) -> Iterator:
    """The photo set in `data` (built if missing) and a SeaweedFS server on localhost, for one benchmark."""
    if not Path(data, "train-000000.tar").exists():
        subprocess.run([sys.executable, str(ROOT / "pipelines/demo/make_data.py"), "--out", data], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = s3_server.start(Path(tmp))
        try:
            yield server
        finally:
            s3_server.stop(server)


if __name__ == "__main__":
    main()
