"""Helpers shared by the tests: real caches from `mdcache extract`, real CLI runs in fresh processes.

No weights can be downloaded here, so every teacher in the tests is a tiny *real* open_clip ViT with
random weights on purpose (`--random-init`), which the cache records in its fingerprint. Caches live
under pytest's session base temp and are addressed by their fingerprint, so asking for the same cache
from several test modules extracts once and then reuses the committed shards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = str(ROOT / "tests" / "assets" / "tiny-clip.json")
TINY_TEACHER = f"open_clip:{TINY_CLIP}"


def extract_cfg(source: str, root: str, **kw):
    from mdcache.extract import ExtractConfig

    base = dict(source=source, root=root, teacher=TINY_TEACHER, random_init=True, image_size=64, views=2,
                codec="fp16", workers=0, batch_size=8, calib_images=16,
                precision="fp32")  # fp32 on a GPU too: the online-equals-offline test compares to 2e-4
    base.update(kw)
    return ExtractConfig(**base)


def run_cli(*args: str, check: bool = True, env: dict | None = None, module: str = "mdcache",
            process: bool | None = None) -> subprocess.CompletedProcess:
    """`mdcache ...` as a user runs it. mdcache commands without their own environment run in this process
    (Typer's CliRunner: no interpreter start-up, no imports paid again); with `env` (credentials, endpoints:
    s3fs caches filesystems per process), for mdtrain, or with process=True, in a fresh process."""
    if process is None:
        process = env is not None or module != "mdcache"
    if not process:
        r = invoke(*args, module=module)
        p = subprocess.CompletedProcess([module, *args], r.exit_code, r.stdout, r.stderr)
    else:
        p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def invoke(*args: str, module: str = "mdcache", env: dict | None = None):
    """A command run in this process through Typer's CliRunner (no interpreter start-up, no imports to pay
    again): the result has exit_code, stdout and stderr. An exception other than a clean exit propagates,
    so a traceback fails the test."""
    import importlib

    from typer.testing import CliRunner

    app = importlib.import_module(f"{module}.cli").app
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})},
                              catch_exceptions=False)


def verify_partial(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mdcache verify` on a cache extracted only in part: what was committed checks out, but the
    cache is INCOMPLETE (exit 1), which is what a trainer would be told."""
    p = run_cli("verify", *args, check=False, env=env)
    assert p.returncode == 1 and p.stdout.strip() == "INCOMPLETE", (p.stdout, p.stderr)
    assert "checksums OK" in p.stderr and "problem" not in p.stderr, p.stderr
    return p


def shard_contents(cache, name: str):
    """(keys, encoded arrays [K, N, ...], view params [K, N, 11]) of a committed shard: what
    `store.write_shard_data` takes, to write the same shard again as a new attempt."""
    import numpy as np

    per_view = [cache.read_encoded(name, v) for v in range(cache.views)]
    arrays = {a: np.stack([arrs[a] for _, arrs, _ in per_view]) for a in per_view[0][1]}
    return per_view[0][0], arrays, np.stack([p for _, _, p in per_view])


STUDENT = "vit_tiny_patch16_224"
# Small, fast, deterministic training flags shared by the CLI tests.
TRAIN_FLAGS = ["--student", STUDENT, "--batch-size", "8", "--warmup-epochs", "0", "--lr", "1e-3",
               "--workers", "2", "--shuffle-buffer", "8", "--no-progress", "--log-every", "1"]


def make_cache(root: Path, source: str, **kw) -> str:
    """A complete cache made by the real extractor (tiny random-init open_clip ViT, 64 px, 4x4 grid)."""
    from mdcache.extract import extract

    url, summary = extract(extract_cfg(source, str(root), **kw), progress=False)
    assert not summary["failed"], summary
    return url


def shared_cache(tmp_path_factory, train_spec: str, codec: str = "fp16") -> str:
    return make_cache(tmp_path_factory.getbasetemp() / f"pretrain-cache-{codec}", train_spec, codec=codec)


def mdtrain(*args: str, check: bool = True, env: dict | None = None, timeout: float = 300,
            torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run `python -m mdtrain ...` (or `torchrun --nproc-per-node N -m mdtrain ...`) in a fresh process."""
    if torchrun:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(torchrun),
               "-m", "mdtrain", *args]
    else:
        cmd = [sys.executable, "-m", "mdtrain", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"mdtrain {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline Weights & Biases run, read from its run file without a network or W&B's
    service: LevelDB log records (32 KiB blocks, a 7-byte header each: crc32, length, type) after a 7-byte
    file header, each record one wandb `Record` protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    data, rows, pending, pos = run_file.read_bytes(), [], b"", 7
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7]) if room >= 7 else (0, 0)
        if length == 0 and kind == 0:  # block trailer or padding
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST fragment of one
            r = pb.Record()
            r.ParseFromString(pending)
            pending = b""
            if r.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows
