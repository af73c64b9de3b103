"""Team-shared caches in a real S3 bucket (SeaweedFS on 127.0.0.1, credentials required)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3_server
from helpers import ROOT, TINY_CLIP, TINY_TEACHER, TRAIN_FLAGS, run_cli, verify_partial

from mdcache import local_copies, open_cache, store
from mdcache.sources import iter_samples, list_source

pytestmark = [pytest.mark.s3, pytest.mark.slow]


@pytest.fixture(scope="module")
def bucket_data(s3, demo_data):
    """The demo shards uploaded to s3://team/data/, plus a 12-shard image folder in s3://team/folder/."""
    fs = s3.fs()
    for f in sorted(demo_data.glob("train-*.tar")):
        fs.put_file(str(f), f"team/data/{f.name}")
    for shard in list_source(str(demo_data / "train-{000000..000003}.tar")):
        for smp in iter_samples(shard):
            fs.pipe_file(f"team/folder/{smp.key.rsplit('-', 1)[0]}/{smp.key}.jpg", smp.data)
    return "s3://team/data/train-{000000..000003}.tar"


def extract_args(source, cache, *extra):
    return ["extract", "--source", source, "--root", cache, "--teacher", TINY_TEACHER, "--random-init",
            "--image-size", "64", "--views", "2", "--codec", "int8", "--workers", "0", "--batch-size", "4",
            "--calib-images", "8", "--folder-shard-size", "10", *extra]


def test_teammate_reuses_the_shared_cache(s3, bucket_data):
    root = "s3://team/shared"
    first = run_cli(*extract_args(bucket_data, root, "--shards", "0:2"), env=s3.env())
    url = first.stdout.strip().splitlines()[-1]
    assert url.startswith(f"{root}/") and "committed 2 shard(s)" in first.stderr
    # A teammate, other credentials source (--storage-option instead of env), same command: only the rest is computed.
    second = run_cli(*extract_args(bucket_data, root), *s3.cli_options())
    assert second.stdout.strip().splitlines()[-1] == url
    assert "reusing 2 committed shard(s) of 4 selected; computing 2" in second.stderr  # (K=2 again: no growth)
    assert "committed 2 shard(s)" in second.stderr
    third = run_cli(*extract_args(bucket_data, root), env=s3.env())
    assert "computing 0" in third.stderr
    ls = run_cli("ls", root, env=s3.env()).stdout
    assert url.rsplit("/", 1)[-1] in ls and "4/4" in ls and "int8" in ls
    cache = open_cache(url, s3.options())
    assert cache.unindexed == 0 and len(cache.commits) == 4  # a listing and the compacted index: no GET per shard
    assert s3.fs().exists(url[len("s3://"):] + "/commit-index.json")
    keys, targets, params = cache.read("train-000003", 1)
    assert len(keys) == 30 and targets.shape == (30, 16, 64) and params.shape == (30, 11)


def test_read_only_credentials_list_verify_read_but_cannot_extract(s3, bucket_data):
    root = "s3://team/ro"
    url = run_cli(*extract_args(bucket_data, root, "--shards", "0:1"), env=s3.env()).stdout.strip().splitlines()[-1]
    ro = s3.env(s3_server.READER)
    assert url.rsplit("/", 1)[-1] in run_cli("ls", root, env=ro).stdout
    assert "teacher check on 4" in verify_partial(url, "--teacher-check", "4", env=ro).stderr
    assert open_cache(url, s3.options(s3_server.READER)).read("train-000000", 0)[1].shape == (30, 16, 64)
    for args in (extract_args(bucket_data, root), extract_args(bucket_data, root, "--views", "3")):  # resume, new
        p = run_cli(*args, env=ro, check=False)
        assert p.returncode == 2 and "no write access" in p.stderr and "Traceback" not in p.stderr
    assert len(open_cache(url, s3.options()).commits) == 1  # nothing was written


def cache_contents(url, so):
    cache = open_cache(url, so)
    return cache, {n: (cache.commits[n]["checksums"], [cache.read_encoded(n, v) for v in range(2)])
                   for n in cache.shard_names}


def assert_same(url_a, url_b, so):
    ca, a = cache_contents(url_a, so)
    cb, b = cache_contents(url_b, so)
    assert ca.complete and cb.complete and sorted(a) == sorted(b)
    assert ca.manifest["codec"] == cb.manifest["codec"]
    for name in a:
        assert a[name][0] == b[name][0], name
        for (ka, xa, va), (kb, xb, vb) in zip(a[name][1], b[name][1]):
            assert ka == kb and np.array_equal(va, vb) and all(np.array_equal(xa[k], xb[k]) for k in xa)


def test_two_concurrent_extractors_one_killed(s3, bucket_data):
    folder = "s3://team/folder"
    env = {**os.environ, **s3.env()}
    procs = [subprocess.Popen([sys.executable, "-m", "mdcache", *extract_args(folder, "s3://team/conc")], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    fs = s3.fs()
    def committed_by_first():  # kill extractor 0 once it has committed a shard of its own, mid-way
        fs.invalidate_cache()
        recs = [json.loads(fs.cat_file(p)) for p in fs.glob("team/conc/*/commits/*.json")]
        return any(r["extractor"].split(":")[1] == str(procs[0].pid) for r in recs)

    deadline, killed = time.time() + 300, False
    while time.time() < deadline and procs[0].poll() is None:
        if committed_by_first():
            procs[0].send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    assert killed, "extractor 0 finished before it could be killed"
    out, err = procs[1].communicate(timeout=600)
    assert procs[1].returncode == 0, err
    url = out.strip().splitlines()[-1]
    cache = open_cache(url, s3.options())
    assert cache.complete and len(cache.commits) == 12
    writers = {rec["extractor"] for rec in cache.commits.values()}
    assert len(writers) == 2, "both extractors should have committed shards"
    assert "committed by another extractor first" not in err  # no shard was computed twice to completion
    clean = run_cli(*extract_args(folder, "s3://team/conc-clean"), env=s3.env()).stdout.strip().splitlines()[-1]
    assert clean.rsplit("/", 1)[-1] == url.rsplit("/", 1)[-1]
    assert_same(url, clean, s3.options())


def test_expired_claim_of_another_machine_is_taken_over(s3, bucket_data):
    root = "s3://team/takeover"
    url = run_cli(*extract_args(bucket_data, root, "--shards", "0:0"), env=s3.env()).stdout.strip().splitlines()[-1]
    fs = s3.fs()
    path = url[len("s3://"):]
    expires = time.time() + 15  # beyond the extractor's start-up, even on a loaded machine
    for i in range(4):  # a teammate on another machine claimed everything, then died
        fs.pipe_file(f"{path}/claims/train-{i:06d}.json", json.dumps(
            {"shard": f"train-{i:06d}", "owner": "bob@other-machine:4242:deadbeef", "expires": expires}).encode())
    p = run_cli(*extract_args(bucket_data, root, "--claim-ttl", "4"), env=s3.env())
    assert "waiting for 4 shard(s) claimed by bob@other-machine:4242:deadbeef" in p.stderr
    assert time.time() >= expires and "committed 4 shard(s)" in p.stderr
    assert open_cache(url, s3.options()).complete
    assert not fs.glob(f"{path}/claims/*.json", refresh=True)  # released after commit
    nowait = run_cli(*extract_args(bucket_data, "s3://team/takeover2", "--no-wait"), env=s3.env())
    assert "committed 4 shard(s)" in nowait.stderr


def test_torchrun_ranks_split_the_shards(s3, bucket_data):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    p = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "0", "-m", "mdcache",
                        *extract_args(bucket_data, "s3://team/ddp")], cwd=ROOT, env={**os.environ, **s3.env()},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    urls = set(line for line in p.stdout.split() if line.startswith("s3://team/ddp/"))
    assert len(urls) == 1
    cache = open_cache(urls.pop(), s3.options())
    assert cache.complete
    ranks = {n: rec["rank"] for n, rec in cache.commits.items()}
    assert ranks == {"train-000000": 0, "train-000001": 1, "train-000002": 0, "train-000003": 1}


def test_lost_commit_race_on_s3(s3):
    """Two writers finish the same shard: the conditional PUT lets exactly the first record stand."""
    url = "s3://team/race/0123456789abcdef"
    first = {"shard": "s0", "path": "shards/s0.aaaa", "samples": 1, "views": 1, "checksums": {}}
    second = {**first, "path": "shards/s0.bbbb"}
    assert store.commit_shard(url, first, s3.options()) is True
    assert store.commit_shard(url, second, s3.options()) is False
    assert json.loads(s3.fs().cat_file("team/race/0123456789abcdef/commits/s0.json")) == first


def test_bench_fetches_teacher_weights_from_the_bucket(s3, bucket_data, tmp_path):
    """`mdcache bench --teacher-weights s3://...` fetches the file like extract does (a full open_clip state dict)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    open_clip.add_model_config(TINY_CLIP)
    torch.manual_seed(7)
    model = open_clip.create_model("tiny-clip")  # what open_clip saves: the full CLIP state dict
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    s3.fs().put_file(str(tmp_path / "w.safetensors"), "team/weights/w.safetensors")
    p = run_cli("bench", "--source", bucket_data, "--teacher", TINY_TEACHER, "--teacher-weights", "s3://team/weights/w.safetensors",
                "--image-size", "64", "--shards", "0:1", "--workers", "0", "--codec", "fp16", "--repeats", "1",
                env={**s3.env(), "MDCACHE_HOME": str(tmp_path / "home")})
    assert "images: 30 x 2 views (30 extracted)" in p.stdout, p.stdout + p.stderr
    ratio = float(p.stdout.split("ratio extraction/teacher-only:")[1].split()[0])
    assert 0 < ratio < float("inf")
    assert "RANDOM weights" not in p.stderr  # the teacher is the bucket's file


def objects(fs, path):
    return [p for p, i in fs.find(path, detail=True).items() if i["type"] != "directory"]


def test_gc_and_rm(s3, bucket_data):
    root = "s3://team/gc"
    url = run_cli(*extract_args(bucket_data, root), env=s3.env()).stdout.strip().splitlines()[-1]
    fs, path = s3.fs(), url[len("s3://"):]
    cache = open_cache(url, s3.options())
    rec = cache.commits["train-000001"]
    for f in fs.find(f"{path}/{rec['path']}"):  # a crashed writer's leftover attempt
        fs.copy(f, f.replace(rec["path"], "shards/train-000001.crashed0001"))
    fs.pipe_file(f"{path}/claims/train-000002.json", json.dumps(
        {"shard": "train-000002", "owner": "x@elsewhere:1:1", "expires": time.time() - 10}).encode())
    dry = run_cli("gc", root, "--grace", "0", env=s3.env())
    assert "would remove" in dry.stdout and "train-000001.crashed0001" in dry.stdout and "expired claim" in dry.stdout
    assert fs.exists(f"{path}/shards/train-000001.crashed0001")
    run_cli("gc", root, "--grace", "0", "--yes", env=s3.env())
    fs.invalidate_cache()  # another process changed the bucket
    # (SeaweedFS may keep an empty directory entry: what counts is that no object remains)
    assert not objects(fs, f"{path}/shards/train-000001.crashed0001")
    assert not fs.exists(f"{path}/claims/train-000002.json")
    assert run_cli("verify", url, env=s3.env()).stdout.strip() == "OK"  # committed data untouched
    assert "nothing to remove" in run_cli("gc", root, "--grace", "0", env=s3.env()).stdout
    # rm one shard: the next extract recomputes exactly it
    run_cli("rm", url, "--shard", "train-000003", "--yes", env=s3.env())
    assert "train-000003" not in open_cache(url, s3.options()).commits
    again = run_cli(*extract_args(bucket_data, root), env=s3.env())
    assert "reusing 3 committed shard(s)" in again.stderr and "committed 1 shard(s)" in again.stderr
    run_cli("rm", url, "--yes", env=s3.env())
    fs.invalidate_cache()
    assert not objects(fs, path)


def test_local_read_through_cache_is_bounded(s3, bucket_data, tmp_path):
    url = run_cli(*extract_args(bucket_data, "s3://team/rt"), env=s3.env()).stdout.strip().splitlines()[-1]
    direct = open_cache(url, s3.options())
    local = tmp_path / "local"
    cache = open_cache(url, s3.options(), local_cache=str(local), local_cache_bytes=10**9)
    for name in cache.shard_names:
        k1, a1, v1 = cache.read_encoded(name, 1)
        k2, a2, v2 = direct.read_encoded(name, 1)
        assert k1 == k2 and np.array_equal(v1, v2) and all(np.array_equal(a1[k], a2[k]) for k in a1)
    copies = sorted(p.name for p in (local / cache.manifest["cache_id"] / "shards").iterdir())
    assert [c.rsplit(".", 1)[0] for c in copies] == cache.shard_names
    # Bounded: room for about two shard copies, least recently used ones go.
    size = local_copies._dir_bytes(str(local / cache.manifest["cache_id"] / "shards" / copies[0]))
    local2 = tmp_path / "local2"
    bounded = open_cache(url, s3.options(), local_cache=str(local2), local_cache_bytes=int(size * 2.5))
    bounded.read_encoded("train-000000", 0)
    bounded.read_encoded("train-000001", 0)
    bounded.read_encoded("train-000002", 0)
    kept = sorted(p.name.rsplit(".", 1)[0] for p in (local2 / cache.manifest["cache_id"] / "shards").iterdir())
    assert len(kept) <= 2 and "train-000002" in kept  # least recently used copies were evicted


def test_a_bad_local_copy_is_fetched_again_and_named(s3, bucket_data, tmp_path, capfd):
    """A local copy that fails its checksum is this machine's problem, not the team bucket's: the shard is read
    from the bucket, the copy dropped (fetched again next time), and the warning names the copy. Only a read
    from the bucket itself that fails is reported against the bucket."""
    p = run_cli(*extract_args(bucket_data, "s3://team/badcopy", "--shards", "0:2"), env=s3.env())
    url = p.stdout.strip().splitlines()[-1]
    local = tmp_path / "local"
    cache = open_cache(url, s3.options(), local_cache=str(local))
    good = cache.read_encoded("train-000001", 1)
    copy = local / cache.manifest["cache_id"] / cache.commits["train-000001"]["path"]
    chunk = copy / "targets" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[::-1])
    capfd.readouterr()
    again = cache.read_encoded("train-000001", 1)
    assert all(np.array_equal(good[1][k], again[1][k]) for k in good[1])
    warning = capfd.readouterr().err
    assert str(copy) in warning and "local copy of s3://" in warning and "fetching the copy again" in warning
    assert not copy.exists()  # dropped
    cache.read_encoded("train-000001", 1)
    assert copy.is_dir() and not capfd.readouterr().err  # fetched again, and good
    remote = url[len("s3://"):] + "/" + cache.commits["train-000001"]["path"] + "/targets/c/1/0/0/0"
    s3.fs().pipe_file(remote, s3.fs().cat_file(remote)[::-1])  # now the bucket's shard itself is bad
    chunk.write_bytes(chunk.read_bytes()[::-1])
    with pytest.raises(store.CacheError, match=rf"^{url}: shard 'train-000001' array 'targets' view 1"):
        cache.read_encoded("train-000001", 1)


def test_eviction_never_deletes_a_shard_under_a_reader(s3, bucket_data, tmp_path):
    """--local-cache smaller than the cache: training cycles through the shards, so the copy about to be reused
    is the least recently used one, and it was evicted while another reader opened it. Every run failed,
    blaming the bucket and advising `mdcache rm --shard` on a good shard. Two trainers with two loader workers
    each share one local cache bounded at one and a half shards, for several epochs."""
    url = run_cli(*extract_args(bucket_data, "s3://team/evict"), env=s3.env()).stdout.strip().splitlines()[-1]
    shard_bytes = max(r["bytes"] for r in open_cache(url, s3.options()).commits.values())
    local = tmp_path / "local"
    env = {**os.environ, **s3.env(), "COLUMNS": "200"}
    procs = [subprocess.Popen([sys.executable, "-m", "mdtrain", "pretrain", "--cache", url, "--local-cache", str(local),
                               "--local-cache-gb", str(1.5 * shard_bytes / 2**30), *TRAIN_FLAGS, "--epochs", "4",
                               "--out", str(tmp_path / f"pt{i}")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0 and "rm --shard" not in err, err[-3000:]
    held = sum(local_copies._dir_bytes(c) for c in local_copies.copies(str(local)))
    assert 0 < held <= 2.5 * shard_bytes  # the bound (and at most the copy read last) once nobody reads
    (tmp_path / "file").write_text("x")
    p = run_cli("pretrain", "--cache", url, "--local-cache", str(tmp_path / "file"), *TRAIN_FLAGS, "--out",
                str(tmp_path / "pt"), module="mdtrain", env=s3.env(), check=False)
    assert p.returncode == 2 and f"--local-cache {tmp_path / 'file'}: cannot hold local copies" in p.stderr
    assert "bucket" not in p.stderr.split("(")[0]


def test_pretrain_from_bucket_through_local_cache_and_storage_bench(s3, bucket_data, demo_data, tmp_path):
    from mdtrain import bench_storage

    url = run_cli(*extract_args(bucket_data, "s3://team/train"), env=s3.env()).stdout.strip().splitlines()[-1]
    local = tmp_path / "local"
    out = tmp_path / "run"
    ro = s3.env(s3_server.READER)  # training needs only read access
    run_cli("pretrain", "--cache", url, "--local-cache", str(local), "--out", str(out), "--epochs", "1",
            "--student", "vit_tiny_patch16_224", "--batch-size", "8", "--warmup-epochs", "0", "--workers", "1",
            "--no-progress", module="mdtrain", env=ro)
    assert (out / "student.safetensors").exists() and (out / "metrics.jsonl").read_text().strip()
    cache_id = url.rsplit("/", 1)[-1]
    assert len(list((local / cache_id / "shards").iterdir())) == 4  # each shard downloaded once, kept locally
    bench = run_cli("bench-storage", "--cache", url, "--batch-size", "8", "--workers", "1", "--repeats", "1",
                    module="mdtrain", env=ro).stdout
    rates = {name: float(bench.split(f"{name:26s}:")[1].split()[0])
             for name in ("local disk", "remote", "remote, local cache cold", "remote, local cache warm")}
    assert all(v > 0 for v in rates.values()), bench
    assert "120 images per pass" in bench  # whole epochs: 4 shards x 30 images, 8 per batch, 1 lane
    # The warm pass reads no byte from the bucket: on a private server, stopped after the cold pass.
    (tmp_path / "s3").mkdir()
    private = s3_server.start(tmp_path / "s3")
    try:
        src, dst = s3.fs(), private.fs()
        for f in src.find(f"team/train/{cache_id}"):
            dst.pipe_file(f, src.cat_file(f))
        for f in sorted(demo_data.glob("train-*.tar")):
            dst.put_file(str(f), f"team/data/{f.name}")
        cfg = bench_storage.StorageBenchConfig(cache=url, batch_size=8, workers=1,
                                               storage_options=private.options(s3_server.READER))
        source = bench_storage.copy_source(open_cache(url, cfg.storage_options), str(tmp_path / "source"))
        through = bench_storage.open_setup(cfg, url, source, local_cache=str(tmp_path / "read-through"))
        direct = bench_storage.open_setup(cfg, url, source)
        assert bench_storage.timed_pass(through, cfg.workers) > 0  # cold: downloads every shard
    finally:
        s3_server.stop(private)
    assert bench_storage.timed_pass(through, cfg.workers) > 0  # warm: the bucket is gone
    with pytest.raises(Exception):  # noqa: B017 (control: any failure to read from the stopped bucket)
        bench_storage.timed_pass(direct, cfg.workers)


def test_trainer_outputs_and_weights_in_the_bucket(s3, bucket_data, tmp_path):
    """--out, --init and --weights take bucket URLs; a second machine resumes from the bucket's last.ckpt."""
    url = run_cli(*extract_args(bucket_data, "s3://team/train"), env=s3.env()).stdout.strip().splitlines()[-1]
    flags = ["--cache", url, "--out", "s3://team/runs/pt", "--student", "vit_tiny_patch16_224", "--batch-size", "8",
             "--warmup-epochs", "0", "--workers", "1", "--no-progress", "--log-every", "1"]
    run_cli("pretrain", *flags, "--epochs", "1", module="mdtrain",
            env={**s3.env(), "MDCACHE_HOME": str(tmp_path / "m1")})
    fs = s3.fs()
    pushed = {p.rsplit("/", 1)[-1] for p in fs.ls("team/runs/pt")}
    assert {"last.ckpt", "student.safetensors", "metrics.jsonl", "loss.png"} <= pushed
    steps_1 = len((fs.cat_file("team/runs/pt/metrics.jsonl")).decode().splitlines())
    # Another machine (empty local mirror): --resume auto continues from the bucket's checkpoint.
    run_cli("pretrain", *flags, "--epochs", "2", "--resume", "auto", module="mdtrain",
            env={**s3.env(), "MDCACHE_HOME": str(tmp_path / "m2")})
    fs.invalidate_cache()
    rows = [json.loads(r) for r in fs.cat_file("team/runs/pt/metrics.jsonl").decode().splitlines()]
    # continued, not restarted
    assert len(rows) == 2 * steps_1 and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    data = bucket_data.rsplit("/", 1)[0]
    ft = run_cli("finetune", "--init", "s3://team/runs/pt/student.safetensors", "--model", "vit_tiny_patch16_224",
                 "--train", bucket_data, "--val", f"{data}/train-000000.tar", "--out", "s3://team/runs/ft",
                 "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--image-size", "64", "--workers", "1",
                 module="mdtrain", env={**s3.env(), "MDCACHE_HOME": str(tmp_path / "m3")})
    assert "init: " in ft.stderr + ft.stdout
    ev = run_cli("eval", "--weights", "s3://team/runs/ft/best.safetensors", "--val", f"{data}/train-000000.tar",
                 "--workers", "1", module="mdtrain", env={**s3.env(), "MDCACHE_HOME": str(tmp_path / "m4")})
    assert json.loads(ev.stdout.strip().splitlines()[-1])["n"] == 30


def test_storage_failures_are_one_named_line_on_every_command(s3, bucket_data, tmp_path):
    """Server down, credentials missing, credentials refused: the URL and what to check, exit 2, no traceback."""
    url = run_cli(*extract_args(bucket_data, "s3://team/fail", "--shards", "0:1"), env=s3.env()).stdout.split()[-1]
    down = {**s3.env(), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    nobody = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
              "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": s3.endpoint}
    wrong = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    cases = [(("pretrain", "--cache", url, *TRAIN_FLAGS, "--out", str(tmp_path / "pt")), down,
              f"cannot reach the storage ({url})"),
             (("verify", url), nobody, f"no credentials for the storage ({url})"),
             (("info", url), wrong, f"the storage refused these credentials ({url})"),
             (extract_args(bucket_data, "s3://team/fail"), wrong, "refused these credentials")]
    for args, env, expected in cases:
        p = run_cli(*args, env=env, check=False, module="mdtrain" if args[0] == "pretrain" else "mdcache")
        assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-1500:])


def test_transcode_in_the_bucket_resumes_and_trains(s3, bucket_data, tmp_path):
    """A team extracts once and derives a pca cache in the same bucket: claims, commits and resume as extract;
    the basis is an array in the bucket, read back (and checked) by a trainer elsewhere."""
    root = "s3://team/transcode"
    src = run_cli(*extract_args(bucket_data, root), env=s3.env()).stdout.strip().splitlines()[-1]
    first = run_cli("transcode", src, "--codec", "pca:16", "--shards", "0:2", "--device", "cpu", env=s3.env())
    url = first.stdout.strip().splitlines()[-1]
    assert url.startswith(f"{root}/") and url != src and "committed 2 shard(s)" in first.stderr
    second = run_cli("transcode", src, "--codec", "pca:16", "--device", "cpu", *s3.cli_options())
    assert second.stdout.strip().splitlines()[-1] == url and "reusing 2 committed shard(s)" in second.stderr
    cache, source = open_cache(url, s3.options()), open_cache(src, s3.options())
    assert cache.complete and cache.manifest["fingerprint"]["transcoded_from"]["cache_id"] == source.cache_id
    assert s3.fs().exists(f"{url[len('s3://'):]}/{cache.manifest['codec']['calibration']['basis']['array']}")
    k0, _, p0 = source.read("train-000003", 1)
    k1, t1, p1 = cache.read("train-000003", 1)
    assert k0 == k1 and np.array_equal(p0, p1) and t1.shape == (30, 16, 64)
    run_cli("pretrain", "--cache", url, "--out", str(tmp_path / "pt"), "--epochs", "1", *TRAIN_FLAGS,
            "--local-cache", str(tmp_path / "local"), env=s3.env(), module="mdtrain")


def test_two_extractors_grow_a_shared_cache_together(s3, bucket_data):
    """K=2 on two shards, then two teammates at once ask for K=4 on all four: the two stored shards grow, the
    others are made, each (shard, K) committed once, and the result equals a fresh K=4 extraction."""
    root, env = "s3://team/grow", {**os.environ, **s3.env()}
    small = run_cli(*extract_args(bucket_data, root, "--shards", "0:2"), env=s3.env()).stdout.strip().splitlines()[-1]
    procs = [subprocess.Popen([sys.executable, "-m", "mdcache", *extract_args(bucket_data, root, "--views", "4")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert {o.strip().splitlines()[-1] for o, _ in outs} == {small}
    cache = open_cache(small, s3.options(), records=True)
    assert cache.complete and cache.views == 4
    assert sorted(cache.records) == ["train-000000@2", "train-000000@4", "train-000001@2", "train-000001@4",
                                     "train-000002@4", "train-000003@4"]
    assert not any("committed by another extractor first" in e for _, e in outs)
    fresh = run_cli(*extract_args(bucket_data, "s3://team/grow-fresh", "--views", "4"),
                    env=s3.env()).stdout.strip().splitlines()[-1]
    other = open_cache(fresh, s3.options())
    for name in cache.shard_names:
        for v in range(4):
            (ka, xa, va), (kb, xb, vb) = cache.read_encoded(name, v), other.read_encoded(name, v)
            assert ka == kb and np.array_equal(va, vb) and all(np.array_equal(xa[k], xb[k]) for k in xa), (name, v)
    old = [cache.records[f"train-00000{i}@2"]["path"] for i in range(2)]
    out = run_cli("gc", small, "--superseded", "--superseded-after", "0", "--yes", env=s3.env()).stdout
    assert out.count("record superseded by") == 2 and all(p in out for p in old)
    cache = open_cache(small, s3.options(), records=True)
    assert sorted(cache.records) == [f"train-00000{i}@4" for i in range(4)] and cache.views == 4
    assert cache.stats()["bytes_stored"] == cache.stats()["bytes"]
    assert run_cli("verify", small, env=s3.env()).stdout.strip() == "OK"


def test_a_second_teacher_on_a_bucket_caches_views_trains_with_it(s3, bucket_data, tmp_path):
    """`--views-of` a cache in the bucket (its source taken from it), the new cache in the bucket too, and one
    student trained from both with read-only credentials: the two caches line up key by key and view by view."""
    root = "s3://team/two"
    a = run_cli(*extract_args(bucket_data, root), env=s3.env()).stdout.strip().splitlines()[-1]
    b = run_cli("extract", "--views-of", a, "--root", root, "--teacher", TINY_TEACHER, "--random-init",
                "--teacher-seed", "1", "--image-size", "32", "--codec", "int8", "--workers", "0", "--batch-size", "4",
                "--calib-images", "8", env=s3.env()).stdout.strip().splitlines()[-1]
    ca, cb = open_cache(a, s3.options()), open_cache(b, s3.options())
    assert cb.manifest["fingerprint"]["views"]["views_of"] == ca.cache_id and cb.complete
    for name in ca.shard_names:
        for v in range(2):
            (ka, _, pa), (kb, _, pb) = ca.read_encoded(name, v, targets=False), cb.read_encoded(name, v, targets=False)
            assert ka == kb and np.array_equal(pa, pb), (name, v)
    out = tmp_path / "run"
    run_cli("pretrain", "--cache", a, "--cache", b, "--out", str(out), "--epochs", "1", "--stop-after", "3",
            *TRAIN_FLAGS, module="mdtrain", env=s3.env(s3_server.READER))
    teachers = json.loads((out / "config.json").read_text())["teachers"]
    assert [t["cache_id"] for t in teachers] == [ca.cache_id, cb.cache_id] and teachers[1]["grid"] == [2, 2]
