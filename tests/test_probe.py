"""Nothing deleted, nothing misread: the findings of a hostile probe of the cache, each with the test that
would have caught it. Silent wrong data (edited array types, merged calibrations, changed sources), data
loss (a wrong commit index steering gc and repair advice), a hang, and user mistakes that ended in a
traceback. The bucket-only findings (the local read-through cache) are in test_s3.py."""
from __future__ import annotations

import json
import shutil
import tarfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TRAIN_FLAGS, invoke, make_cache, shard_contents

from mdcache import claims, extract, local_copies, open_cache, store, transcode
from mdcache.errors import CacheError, SourceError


@pytest.fixture(scope="module")
def caches(tmp_path_factory, demo_data) -> dict[str, str]:
    """One complete two-shard cache per codec: fp16 extracted, the others transcoded from it (calibrated on 16
    images). Tests damage copies of them, never these."""
    root = tmp_path_factory.mktemp("probe")
    out = {"fp16": make_cache(root, str(demo_data / "train-{000000..000001}.tar"))}
    for codec in ("int8", "int4", "pca:8"):
        url, summary = transcode.transcode(transcode.TranscodeConfig(
            src=out["fp16"], codec=codec, root=str(root), device="cpu", batch_size=16, calib_images=16),
            progress=False)
        assert not summary["failed"]
        out[codec] = url
    return out


@pytest.fixture()
def copy_of(caches, tmp_path):
    """A private copy of one of the caches (same id, in a root of its own)."""
    def copy(codec: str) -> str:
        dst = tmp_path / codec.replace(":", "-") / Path(caches[codec]).name
        shutil.copytree(caches[codec], dst)
        return str(dst)
    return copy


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


# ----------------------------------------------------------------------------- silent wrong data

@pytest.mark.parametrize("codec,array,dtype", [("fp16", "targets", "int16"), ("int8", "targets", "uint8"),
                                               ("int4", "scales", "int16"), ("pca:8", "token", "uint16"),
                                               ("int8", "views", "uint32")])
def test_an_array_whose_data_type_was_edited_is_refused(copy_of, codec, array, dtype):
    """Checksums hash raw bytes: the same bytes read as another type passed verify and trained on values 1e10
    times too large. Every read now checks each array's type and shape against what the codec stores."""
    url = copy_of(codec)
    shard = open_cache(url).shard_names[0]
    edit_json(Path(url) / open_cache(url).commits[shard]["path"] / array / "zarr.json",
              lambda m: m.__setitem__("data_type", dtype))
    with pytest.raises(CacheError, match=rf"shard '{shard}' array '{array}' is {dtype} .*edited or damaged"):
        open_cache(url).read(shard, 0)
    r = invoke("verify", url)
    assert r.exit_code == 1 and r.stdout.strip() == "FAILED" and f"array '{array}' is {dtype}" in r.stderr
    if codec == "int8":
        r = invoke("pretrain", "--cache", url, *TRAIN_FLAGS, "--workers", "0", "--epochs", "1", "--out",
                   str(Path(url).parent / "pt"), module="mdtrain")
        assert r.exit_code == 2 and "edited or damaged" in r.stderr and "source" not in r.stderr


def test_a_basis_whose_data_type_was_edited_is_refused(copy_of):
    url = copy_of("pca:8")
    ref = open_cache(url).manifest["codec"]["calibration"]["basis"]
    edit_json(Path(url) / ref["array"] / "zarr.json", lambda m: m.__setitem__("data_type", "int32"))
    with pytest.raises(CacheError, match="calibration array .* does not match its checksum"):
        _ = open_cache(url).calibration
    for cmd in ("info", "verify"):  # info used to exit 0 with a damaged or missing basis
        r = invoke(cmd, url)
        assert r.exit_code == 2 and "does not match its checksum" in r.stderr
    shutil.rmtree(Path(url) / ref["array"])
    r = invoke("info", url)
    assert r.exit_code == 2 and "is missing or unreadable" in r.stderr


def tc(src: str, root: Path, calib_images: int) -> str:
    url, _ = transcode.transcode(transcode.TranscodeConfig(src=src, codec="pca:8", root=str(root), device="cpu",
                                                           batch_size=16, calib_images=calib_images), progress=False)
    return url


def test_calibration_settings_are_part_of_the_identity(caches, tmp_path):
    a, b = tc(caches["fp16"], tmp_path / "a", 8), tc(caches["fp16"], tmp_path / "b", 4)
    assert Path(a).name != Path(b).name  # different bases: different caches
    assert open_cache(a).manifest["fingerprint"]["codec"]["calib_images"] == 8
    assert "calib_images" not in open_cache(caches["fp16"]).manifest["fingerprint"]["codec"]  # fp16: no calibration


def test_a_shard_encoded_with_another_calibration_is_refused(caches, tmp_path, monkeypatch):
    """Two roots whose caches share an id but not a calibration (another software version calibrating
    differently, say): a merge of the two, as `s3 sync` does, read shards against the wrong basis with
    verify OK. Each record now names the calibration it was encoded with."""
    a = tc(caches["fp16"], tmp_path / "a", 8)
    calibrate = transcode.calibrate
    monkeypatch.setattr(transcode, "calibrate", lambda cfg, src, device: calibrate(replace(cfg, calib_images=4), src,
                                                                                    device))
    b = tc(caches["fp16"], tmp_path / "b", 8)
    assert Path(a).name == Path(b).name
    assert open_cache(a).manifest["codec"]["calibration"] != open_cache(b).manifest["codec"]["calibration"]
    shard = "train-000001"
    rec = open_cache(b).commits[shard]
    shutil.copytree(Path(b) / rec["path"], Path(a) / rec["path"])  # the merge: b's shard lands in a
    (Path(a) / "commits" / f"{store.record_stem(rec)}.json").write_text(json.dumps(rec))
    with pytest.raises(CacheError, match=f"shard '{shard}' was encoded with another codec calibration"):
        open_cache(a).read(shard, 0)
    r = invoke("verify", a)
    assert r.exit_code == 1 and "another codec calibration" in r.stderr and "train-000000" not in r.stderr


@pytest.mark.parametrize("codec", ["int4", "pca:8"])
def test_a_compact_codec_without_its_calibration_checksum_is_refused(copy_of, codec):
    """int4 and pca never existed without the checksum: its absence is damage (an edit of the basis scale
    plus a deleted checksum used to give only the 'older mdcache' warning)."""
    url = copy_of(codec)

    def strip(m):
        del m["codec"]["calibration_sha256"]
        m["codec"]["calibration"]["std" if codec == "int4" else "component_std"][0] *= 3
    edit_json(Path(url) / store.MANIFEST, strip)
    with pytest.raises(CacheError, match=f"the {codec} codec's calibration checksum is missing"):
        open_cache(url)


def test_a_source_rewritten_since_extraction_is_named_by_the_webdataset_stage(caches, demo_data, tmp_path):
    """Same keys, other pixels: the manifest records each source shard's size, and a stage that meets a
    shard of another size says so before a sample goes out."""
    import webdataset as wds

    from mdcache.wds import with_targets

    for i in range(2):
        shutil.copy(demo_data / f"train-00000{i}.tar", tmp_path / f"train-00000{i}.tar")
    with tarfile.open(tmp_path / "train-000001.tar", "a") as tf:  # one more member: the same keys, a new size
        tf.add(demo_data / "train-000000.tar", arcname="extra.bin")
    cache = open_cache(caches["fp16"])
    urls = [str(tmp_path / f"train-00000{i}.tar") for i in range(2)]
    first = list(wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False).compose(with_targets(cache)))
    assert len(first) == 30
    with pytest.raises(SourceError, match=r"train-000001.tar' \(train-000001\) is \d+ bytes now but was"):
        list(wds.WebDataset(urls[1:], shardshuffle=False, empty_check=False).compose(with_targets(cache)))
    with pytest.raises(CacheError, match="view=1.5 is not a view index"):
        with_targets(cache, view=1.5)


# ----------------------------------------------------------------------------- a wrong commit index

def index_path(url: str) -> Path:
    return Path(url) / store.COMMIT_INDEX


def entry(index: dict, shard: str) -> dict:
    """The index entry of a shard's record (keyed by record stem: shard@K)."""
    return next(v for k, v in index["records"].items() if store.shard_of(k) == shard)


def test_a_wrong_path_in_the_index_never_makes_gc_delete_committed_data(copy_of, capfd):
    """The index named another (absent) attempt: reads said 'data missing', extract said 'reusing', and
    `gc --grace 0 --yes` removed the real attempt as uncommitted. Every decision now reads the records."""
    url = copy_of("int8")
    shard, real = "train-000000", open_cache(url).commits["train-000000"]["path"]
    before = open_cache(url).read(shard, 1)
    edit_json(index_path(url), lambda i: entry(i, shard)["record"].__setitem__("path", f"shards/{shard}.gone"))
    cache = open_cache(url)
    assert cache.commits[shard]["path"] == f"shards/{shard}.gone"  # the reader's shortcut trusts the index...
    after = cache.read(shard, 1)  # ...until a read fails: then the record itself decides
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert "commit-index.json was wrong about shard train-000000" in capfd.readouterr().err
    r = invoke("gc", url, "--grace", "0", "--yes")
    assert r.exit_code == 0 and real not in r.stdout and "rewriting" in r.stdout
    assert (Path(url) / real).is_dir() and invoke("verify", url).stdout.strip() == "OK"
    assert entry(json.loads(index_path(url).read_text()), shard)["record"]["path"] == real


def test_a_wrong_checksum_in_the_index_never_advises_removing_a_good_shard(copy_of):
    url = copy_of("fp16")
    shard = "train-000001"
    edit_json(index_path(url), lambda i: entry(i, shard)["record"]["checksums"]["targets"].__setitem__(0, "0" * 64))
    assert np.array_equal(open_cache(url).read(shard, 0)[1], open_cache(url, records=True).read(shard, 0)[1])
    r = invoke("verify", url)
    assert r.exit_code == 0 and r.stdout.strip() == "OK" and "rm --shard" not in r.stderr
    assert "index:" in r.stderr and "rewritten" in r.stderr
    assert entry(json.loads(index_path(url).read_text()), shard)["record"] == open_cache(url).commits[shard]


def test_a_record_swapped_in_the_index_is_caught_and_the_index_rewritten(copy_of, demo_data):
    """The record of one shard under another's name (stamps kept): pretrain's key check blamed the source.
    Now the entry is refused as damaged, readers read the record, and extract rewrites the index."""
    url = copy_of("fp16")
    good = {n: open_cache(url).read(n, 0)[0] for n in ("train-000000", "train-000001")}

    def swap(i):
        a, b = entry(i, "train-000000"), entry(i, "train-000001")
        a["record"], b["record"] = b["record"], a["record"]
    edit_json(index_path(url), swap)
    cache = open_cache(url)
    assert {n: cache.read(n, 0)[0] for n in good} == good and cache.index_problems
    src = str(demo_data / "train-{000000..000001}.tar")
    from helpers import extract_cfg

    _, summary = extract.extract(extract_cfg(src, str(Path(url).parent)), progress=False)
    assert summary["reused"] == 2 and not summary["committed"]
    assert not open_cache(url).index_problems  # rewritten by the extract


@pytest.mark.parametrize("shape", ["records-list", "entry-string", "no-record", "record-null"])
def test_an_index_of_the_wrong_shape_is_only_a_lost_shortcut(copy_of, tmp_path, shape):
    """Valid JSON of the wrong shape crashed read, info, verify, extract, pretrain and rm --shard with a
    traceback, and ls/gc of the whole root."""
    url = copy_of("int8")
    damage = {"records-list": lambda i: i.__setitem__("records", list(i["records"])),
              "entry-string": lambda i: i["records"].__setitem__("train-000000@2", "x"),
              "no-record": lambda i: entry(i, "train-000000").pop("record"),
              "record-null": lambda i: entry(i, "train-000000").__setitem__("record", None)}[shape]
    edit_json(index_path(url), damage)
    assert open_cache(url).read_encoded("train-000000", 1)[1]["targets"].shape == (30, 16, 64)
    assert invoke("info", url).exit_code == 0
    r = invoke("ls", str(Path(url).parent))
    assert r.exit_code == 0 and Path(url).name in r.stdout
    r = invoke("verify", url)
    assert r.exit_code == 0 and "rewritten" in r.stderr
    edit_json(index_path(url), damage)
    assert invoke("gc", str(Path(url).parent), "--grace", "0").exit_code == 0
    r = invoke("pretrain", "--cache", url, *TRAIN_FLAGS, "--workers", "0", "--epochs", "1", "--stop-after", "1",
               "--out", str(tmp_path / "pt"), module="mdtrain")
    assert r.exit_code == 0, r.stderr[-2000:]
    r = invoke("rm", url, "--shard", "train-000000", "--yes")
    assert r.exit_code == 0 and "train-000000" not in open_cache(url).commits


# ----------------------------------------------------------------------------- no hang, no traceback

def test_a_negative_batch_size_is_refused_instead_of_waiting_on_its_own_claims(caches):
    t0 = time.time()
    r = invoke("transcode", caches["fp16"], "--codec", "int4", "--batch-size", "-2")
    assert r.exit_code == 2 and r.stderr.strip() == "error: --batch-size -2: must be at least 1"
    assert time.time() - t0 < 30


def test_a_job_never_waits_on_a_claim_it_holds_itself(copy_of, demo_data):
    """Whatever a pass leaves claimed by this job but uncommitted is released and reported, not waited for."""
    url = copy_of("fp16")
    rec = open_cache(url).commits["train-000001"]
    store.drop_commit(url, store.record_stem(rec), rec["path"])
    cache = open_cache(url)
    todo = [s for s in cache.sources() if s.name not in cache.commits]
    summary = extract.new_summary(url, 0)
    t0 = time.time()
    extract.run_claimed(cache, todo, summary, lambda todo, c: [c.acquire(s.name) for s in todo], 60.0, True,
                        cache.views)
    assert time.time() - t0 < 20 and "neither committed nor failed" in summary["failed"]["train-000001"]
    assert not list((Path(url) / "claims").glob("*.json"))


@pytest.mark.parametrize("args,message", [
    (("plan", "--bench", "/nonexistent/bench.json"), "--bench /nonexistent/bench.json: cannot read it"),
    (("plan", "--bench", "LIST"), "not a `mdcache bench --json-out` result"),
    (("plan", "--views", "-3"), "--views -3: must be at least 1"),
    (("plan", "--images", "-5"), "--images -5: must be at least 1"),
    (("plan", "--train-ips", "nan"), "--train-ips nan: must be a finite number"),
    (("plan", "--tokens", "0"), "--tokens 0: must be at least 1"),
    (("show", "FP16", "--n", "0"), "--n 0: must be at least 1"),
    (("show", "FP16", "--n", "-1"), "--n -1: must be at least 1"),
    (("show", "FP16", "--out", "/nonexistent/dir/x.png"), "the folder /nonexistent/dir does not exist"),
    (("transcode", "FP16", "--codec", "int4", "--batch-size", "0"), "--batch-size 0: must be at least 1"),
    (("transcode", "FP16", "--codec", "int4", "--calib-images", "-1"), "--calib-images -1: must be at least 1"),
    (("transcode", "FP16", "--codec", "int4", "--shards", "5:9"), "--shards '5:9' selects none of the 2 shards"),
    (("extract", "--source", "SRC", "--views", "0"), "--views 0: must be at least 1"),
    (("extract", "--source", "SRC", "--crop-scale", "0.9", "0.2"), "--crop-scale 0.9 0.2: give MIN MAX"),
    (("pretrain", "--cache", "FP16", "--out", "FILE/sub"), "--out FILE/sub: cannot write there"),
    (("pretrain", "--cache", "FP16", "--log", "tensorboard", "--out", "TBFILE"), "--log tensorboard: cannot write"),
])
def test_user_mistakes_are_one_named_line(caches, tmp_path, demo_data, args, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "tensorboard").write_text("a file where the folder should be")
    (tmp_path / "list.json").write_text("[1, 2]")
    subst = {"FP16": caches["fp16"], "SRC": str(demo_data / "train-000000.tar"), "LIST": str(tmp_path / "list.json"),
             "FILE/sub": str(tmp_path / "file" / "sub"), "TBFILE": str(tmp_path / "tb")}
    args = [subst.get(a, a) for a in args]
    if args[0] == "pretrain":
        args += [*TRAIN_FLAGS, "--workers", "0", "--epochs", "1"]
    r = invoke(*args, module="mdtrain" if args[0] == "pretrain" else "mdcache")
    expected = message.replace("FILE/sub", str(tmp_path / "file" / "sub"))
    assert r.exit_code == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU that this machine has")
def test_a_gpu_asked_for_on_a_machine_without_one_is_one_line(caches):
    r = invoke("transcode", caches["fp16"], "--codec", "int4", "--device", "cuda")
    assert r.exit_code == 2 and "--device cuda: no CUDA GPU is available" in r.stderr


def test_show_into_a_folder_says_which_file_it_wrote(caches, tmp_path):
    r = invoke("show", caches["fp16"], "--out", str(tmp_path), "--n", "1")
    assert r.exit_code == 0 and (tmp_path / "views.png").exists() and f"wrote {tmp_path / 'views.png'}" in r.stderr
    r = invoke("show", caches["fp16"], "--out", str(tmp_path / "pic"), "--n", "1")
    assert (tmp_path / "pic.png").exists() and f"wrote {tmp_path / 'pic.png'}" in r.stderr


def test_every_numeric_option_of_every_command_has_bounds():
    """The edge checks what it knows: an int or float option without bounds would let a negative size through."""
    import dataclasses
    import typing

    import typer

    from mdcache.cli import app as mdcache_app
    from mdcache.commands import CONFIGS
    from mdtrain.cli import app as mdtrain_app

    names = {f"{prog} {n}" for prog, app in (("mdcache", mdcache_app), ("mdtrain", mdtrain_app))
             for n in typer.main.get_command(app).commands}
    assert names == set(CONFIGS)  # every command has its configuration registered
    unbounded = []
    for name, cfg_cls in CONFIGS.items():
        for f in dataclasses.fields(cfg_cls):
            hint = str(typing.get_type_hints(cfg_cls)[f.name])
            if any(t in hint for t in ("int", "float")) and "dict" not in hint and "bounds" not in f.metadata:
                unbounded.append(f"{name} {f.name}")
    assert not unbounded


# ----------------------------------------------------------------------------- two races

def test_a_failed_write_leaves_no_attempt_even_with_slow_writes_in_flight(caches, tmp_path, monkeypatch):
    """zarr writes the chunks of one assignment concurrently: when one failed, the others kept landing after
    the cleanup, and an attempt directory was left behind on a loaded machine. A slowed store makes the
    late writes certain: chunks are now written one at a time, so there are none."""
    import asyncio

    from zarr.storage import LocalStore

    set_ = LocalStore.set

    async def slow_or_failing(self, key, value, *a, **kw):
        if key.startswith("targets/c/1"):
            raise OSError(28, "No space left on device")
        if "/c/" in key:
            await asyncio.sleep(0.3)
        return await set_(self, key, value, *a, **kw)

    src = open_cache(caches["fp16"])
    dst = tmp_path / "c"
    shutil.copytree(caches["fp16"], dst / src.cache_id)
    url = str(dst / src.cache_id)
    contents = shard_contents(src, "train-000000")
    monkeypatch.setattr(LocalStore, "set", slow_or_failing)
    with pytest.raises(CacheError, match="writing shard train-000000 failed: No space left on device"):
        store.write_shard_data(url, "train-000000", *contents, {})
    time.sleep(1.0)  # anything still in flight would land now
    assert sorted(p.name for p in (dst / src.cache_id / "shards").iterdir()) == \
        sorted(Path(r["path"]).name for r in src.commits.values())


def test_a_release_during_a_renewal_is_not_undone(tmp_path, monkeypatch):
    """The renewer read the claim (ours), the writer released it after the commit, then the renewer wrote it
    back: a claim left after the commit. A slowed renewal makes the interleaving certain."""
    url = str(tmp_path / "cache")
    c = claims.Claims(url, claims.new_owner(), ttl=60)
    assert c.acquire("s0") is None
    read_json = claims.mfs.read_json
    in_renewal = threading.Event()

    def slow_read(fs, path):
        out = read_json(fs, path)
        if threading.current_thread().name == "renewer":
            in_renewal.set()
            time.sleep(0.5)  # the release happens in this window
        return out
    monkeypatch.setattr(claims.mfs, "read_json", slow_read)
    t = threading.Thread(target=c.renew, args=("s0",), name="renewer")
    t.start()
    in_renewal.wait(5)
    c.release("s0")
    t.join()
    assert not (tmp_path / "cache" / "claims" / "s0.json").exists()
    assert c.renew("s0") is False  # released: never renewed again


def test_an_evictor_never_removes_a_copy_a_reader_holds(tmp_path):
    """Training cycles through shards, so the copy about to be read again is the least recently used one: it
    was deleted under its next reader. Now a held copy is passed over (the bound waits for it)."""
    root = tmp_path / "local"
    held, other = (root / "cid" / "shards" / f"s{i}.attempt" for i in range(2))
    for d in (held, other):
        d.mkdir(parents=True)
        (d / "data").write_bytes(b"x" * 1000)
    with local_copies.reading(str(held)):
        assert local_copies.evict_lru(str(root), 0) == [str(other)]
        assert held.is_dir() and not other.exists()
    assert local_copies.evict_lru(str(root), 0) == [str(held)]


def test_a_local_cache_that_cannot_hold_copies_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(local_copies.LocalCopyError, match=f"--local-cache {tmp_path / 'file'}: cannot hold"):
        local_copies.check_dir(str(tmp_path / "file"))


def test_a_full_disk_during_a_checkpoint_leaves_no_temp_file(caches, tmp_path):
    """The file-size limit of the process makes the checkpoint's write fail as a full disk would: one line,
    exit 2, no `last.ckpt.tmp-PID` left beside the outputs."""
    import resource
    import signal
    import subprocess
    import sys

    from helpers import ROOT

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    out = tmp_path / "pt"
    p = subprocess.run([sys.executable, "-m", "mdtrain", "pretrain", "--cache", caches["fp16"], *TRAIN_FLAGS,
                        "--workers", "0", "--epochs", "1", "--stop-after", "1", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, preexec_fn=limit_file_size)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"writing {out}/last.ckpt failed" in p.stderr and "the previous last.ckpt, if any, is intact" in p.stderr
    assert not list(out.glob("*.tmp*")) and not (out / "last.ckpt").exists()


def test_two_evictors_at_once_never_empty_the_local_cache(tmp_path, monkeypatch):
    """Two trainers sharing a --local-cache bounded at 1.5 copies, each keeping the copy it just read: both
    measured 2 copies at once, each removed the other's, and the cache was left empty (CI saw it on S3). One
    evictor at a time: the second finds the bound already met."""
    import threading

    root = tmp_path / "local"
    a, b = (root / "cid" / "shards" / f"s{i}.attempt" for i in range(2))
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "data").write_bytes(b"x" * 1000)
    mtime, other = local_copies._mtime, []

    def meanwhile(path):  # the other trainer evicts while this one has measured but not yet removed anything
        if not other:
            other.append(threading.Thread(target=local_copies.evict_lru, args=(str(root), 1500, str(b))))
            other[0].start()
            other[0].join(timeout=1)  # it finishes here without the lock; with it, it waits for this evictor
        return mtime(path)
    monkeypatch.setattr(local_copies, "_mtime", meanwhile)
    assert local_copies.evict_lru(str(root), 1500, keep=str(a)) == [str(b)]
    other[0].join(timeout=10)
    assert not other[0].is_alive() and a.is_dir() and not b.exists()
