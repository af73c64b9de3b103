"""Nothing wrong is read: an edited or damaged manifest or commit record is refused with the file's name,
before a single target is decoded, and a damaged cache can still be listed around and removed."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers import TRAIN_FLAGS, extract_cfg, run_cli, shard_contents

from mdcache import open_cache, store
from mdcache.errors import SourceError
from mdcache.extract import extract
from mdcache.sources import iter_samples, list_source


@pytest.fixture()
def int8_cache(tmp_path, train_spec) -> str:
    url, _ = extract(extract_cfg(train_spec, str(tmp_path / "root"), codec="int8", shards="0:1"), progress=False)
    return url


def edit_manifest(url: str, change) -> Path:
    path = Path(url) / store.MANIFEST
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))
    return path


def test_an_edited_calibration_is_refused_by_every_reader(int8_cache):
    """One channel's int8 mean edited: without a checksum every target would decode wrongly, and
    verify, info and pretrain would all succeed (exit 0)."""
    before = open_cache(int8_cache).read("train-000000", 0)[1]
    assert open_cache(int8_cache).manifest["codec"]["calibration_sha256"]

    def bump(m):
        m["codec"]["calibration"]["mean"][3] += 0.5
    path = edit_manifest(int8_cache, bump)
    with pytest.raises(store.CacheError, match="calibration does not match its checksum") as e:
        open_cache(int8_cache)
    assert str(path) in str(e.value)
    for args in (("verify", int8_cache), ("info", int8_cache)):
        p = run_cli(*args, check=False)
        assert p.returncode == 2 and "calibration does not match" in p.stderr and "Traceback" not in p.stderr
    out = str(path.parent.parent / "pt")
    p = run_cli("pretrain", "--cache", int8_cache, *TRAIN_FLAGS, "--epochs", "1", "--out", out, module="mdtrain",
                check=False)
    assert p.returncode == 2 and "calibration does not match" in p.stderr
    edit_manifest(int8_cache, lambda m: m["codec"]["calibration"]["mean"].__setitem__(
        3, m["codec"]["calibration"]["mean"][3] - 0.5))  # put back: the same targets as before
    assert (open_cache(int8_cache).read("train-000000", 0)[1] == before).all()


def test_a_fingerprint_that_is_not_the_id_is_refused(int8_cache):
    def widen(m):
        m["fingerprint"]["views"]["crop_scale"] = [0.5, 1.0]  # the targets were made with another recipe
    edit_manifest(int8_cache, widen)
    with pytest.raises(store.CacheError, match="is not the hash of its fingerprint"):
        open_cache(int8_cache)

    def swap_codec(m):
        m["fingerprint"]["codec"]["name"] = "fp16"
        m["cache_id"] = store.cache_id(m["fingerprint"])  # a consistent id, but the codec record disagrees
    edit_manifest(int8_cache, swap_codec)
    with pytest.raises(store.CacheError, match="differs from the fingerprint"):
        open_cache(int8_cache)


@pytest.mark.parametrize("damage", ["empty", "truncated", "list"])
def test_damaged_manifest_or_commit_record_names_the_file(int8_cache, damage):
    record = next(Path(int8_cache).glob("commits/train-000000@*.json")).relative_to(int8_cache)
    for name in (store.MANIFEST, str(record)):
        path = Path(int8_cache) / name
        good = path.read_bytes()
        path.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "list": b"[1, 2]"}[damage])
        with pytest.raises(store.CacheError) as e:
            open_cache(int8_cache)
        assert str(path) in str(e.value) and "damaged" in str(e.value)
        p = run_cli("info", int8_cache, check=False)
        assert p.returncode == 2 and name.rsplit("/", 1)[-1] in p.stderr and "Traceback" not in p.stderr
        path.write_bytes(good)
    assert open_cache(int8_cache).commits  # restored: readable again


def test_a_damaged_cache_is_listed_around_and_can_be_removed(int8_cache, tmp_path, train_spec):
    other, _ = extract(extract_cfg(train_spec, str(tmp_path / "root"), codec="fp16", shards="0:1"), progress=False)
    edit_manifest(int8_cache, lambda m: m["codec"]["calibration"]["std"].reverse())
    ls = run_cli("ls", str(tmp_path / "root"))
    assert other.rsplit("/", 1)[-1] in ls.stdout and int8_cache.rsplit("/", 1)[-1] not in ls.stdout
    assert "skipped" in ls.stderr and int8_cache.rsplit("/", 1)[-1] in ls.stderr
    run_cli("rm", int8_cache, "--yes")
    assert not Path(int8_cache).exists() and Path(other).exists()


def test_deleted_shard_data_is_reported_with_every_bad_shard_and_recomputed(tmp_path, train_spec):
    """A committed shard whose data directory was deleted: verify names it (and every other bad shard, not
    only the first), readers name it, and re-running the same extract recomputes it instead of reusing it."""
    cfg = extract_cfg(train_spec, str(tmp_path / "root"), shards="0:3")
    url, _ = extract(cfg, progress=False)
    cache = open_cache(url)
    gone, damaged = cache.commits["train-000000"]["path"], cache.commits["train-000002"]["path"]
    shutil.rmtree(Path(url) / gone)
    chunk = Path(url) / damaged / "targets" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[::-1])
    assert open_cache(url).missing_data() == ["train-000000"]
    with pytest.raises(store.CacheError, match="train-000000 is committed but its data .* is missing"):
        open_cache(url).read("train-000000", 0)
    bad = run_cli("verify", url, check=False)
    assert bad.returncode == 1 and bad.stdout.strip() == "FAILED" and "checksums BAD" in bad.stderr
    assert "train-000000" in bad.stderr and "train-000002" in bad.stderr and "Traceback" not in bad.stderr
    url2, summary = extract(cfg, progress=False)
    assert url2 == url and summary["reused"] == 2 and summary["committed"] == ["train-000000"]
    fresh = open_cache(url)
    assert fresh.commits["train-000000"]["path"] != gone and not fresh.missing_data()
    assert len(fresh.read("train-000000", 1)[0]) == fresh.commits["train-000000"]["samples"]


def tar_bytes(members: list[tuple[str, bytes]]) -> tuple[bytes, list[int]]:
    """A tar of (name, data) members, and the byte offset of each member's header."""
    buf, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            offsets.append(buf.tell())
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue(), offsets


@pytest.fixture()
def photos(demo_data) -> list[tuple[str, bytes]]:
    return [(s.key, s.data) for s in iter_samples(list_source(str(demo_data / "train-000000.tar"))[0])][:6]


@pytest.mark.parametrize("cut", ["at a header", "inside a header", "in the end blocks"])
def test_a_tar_cut_at_a_member_boundary_is_a_truncated_shard(tmp_path, photos, cut):
    """tarfile reads such a cut as a shorter, valid archive: half the samples would vanish silently."""
    full, offsets = tar_bytes([(f"{k}.jpg", d) for k, d in photos])
    end = offsets[-1] + 512 + -(-len(photos[-1][1]) // 512) * 512  # after the last member's data
    at = {"at a header": offsets[4], "inside a header": offsets[4] + 100, "in the end blocks": end + 512}[cut]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cut-000000.tar").write_bytes(full[:at])
    (tmp_path / "src" / "cut-000001.tar").write_bytes(full)
    shards = list_source(str(tmp_path / "src" / "cut-{000000..000001}.tar"))
    with pytest.raises(SourceError, match="cut-000000.tar' is truncated: it ends at byte"):
        list(iter_samples(shards[0]))
    assert len(list(iter_samples(shards[1]))) == 6  # the intact archive reads whole
    # int8 calibrates on the first usable images: the broken first shard is passed over, not fatal
    url, summary = extract(extract_cfg(str(tmp_path / "src" / "cut-{000000..000001}.tar"), str(tmp_path / "c"),
                                       codec="int8"), progress=False)
    assert set(summary["failed"]) == {"cut-000000"} and "truncated" in summary["failed"]["cut-000000"]
    assert open_cache(url).shard_names == ["cut-000001"] and open_cache(url).calibration["mean"]


def test_a_repeated_key_is_one_error_for_every_reader(tmp_path, photos):
    """The same key twice in a shard, the first copy undecodable: extract used to skip the first and keep the
    second, and training then failed with a misleading 'source changed'. Now every reader stops on it."""
    (tmp_path / "src").mkdir()
    k = photos[1][0]
    twice = [(f"{photos[0][0]}.jpg", photos[0][1]), (f"{k}.jpg", b"not an image"),
             *[(f"{kk}.jpg", d) for kk, d in photos[2:4]], (f"{k}.jpg", photos[1][1])]
    (tmp_path / "src" / "dup-000000.tar").write_bytes(tar_bytes(twice)[0])
    adjacent = [(f"{k}.jpg", photos[1][1]), (f"{k}.jpg", photos[1][1])]
    (tmp_path / "src" / "dup-000001.tar").write_bytes(tar_bytes(adjacent)[0])
    for shard in list_source(str(tmp_path / "src" / "dup-{000000..000001}.tar")):
        with pytest.raises(SourceError, match=f"key '{k}' appears twice"):
            list(iter_samples(shard))
    _, summary = extract(extract_cfg(str(tmp_path / "src" / "dup-{000000..000001}.tar"), str(tmp_path / "c")),
                         progress=False)
    assert set(summary["failed"]) == {"dup-000000", "dup-000001"}
    assert all("appears twice" in why for why in summary["failed"].values())


def test_a_failed_write_is_named_and_leaves_no_attempt_behind(tmp_path, train_spec):
    """A real write failure (the file-size limit of the process, as a full disk would: EFBIG instead of
    ENOSPC): one line naming the shard, exit 2, nothing committed, no half-written attempt directory."""
    import resource
    import signal
    import subprocess
    import sys

    from helpers import ROOT, TINY_TEACHER

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    root = tmp_path / "root"
    p = subprocess.run([sys.executable, "-m", "mdcache", "extract", "--source", train_spec, "--root", str(root),
                        "--teacher", TINY_TEACHER, "--random-init", "--image-size", "64", "--views", "2", "--codec",
                        "fp16", "--workers", "0", "--shards", "0:1"], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=limit_file_size)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "writing shard train-000000 failed: File too large" in p.stderr and "Traceback" not in p.stderr
    cache = next(root.iterdir())
    assert (cache / "manifest.json").exists()  # the cache was created; its shard failed
    assert not list(cache.glob("commits/*.json")) and not list(cache.glob("shards/*"))


def test_opening_a_cache_reads_the_compacted_index_and_trusts_only_the_listing(tmp_path, train_spec):
    """extract leaves commit-index.json, so a reader needs a listing and one file, not a GET per shard. The
    listing stays the truth: a withdrawn record is not resurrected from the index, a replaced one is re-read."""
    url, _ = extract(extract_cfg(train_spec, str(tmp_path / "root"), shards="0:3"), progress=False)
    index = json.loads((Path(url) / store.COMMIT_INDEX).read_text())
    assert set(index["records"]) == {"train-000000@2", "train-000001@2", "train-000002@2"}  # one per shard and K
    cache = open_cache(url)
    assert cache.unindexed == 0 and cache.shard_names == ["train-000000", "train-000001", "train-000002"]
    run_cli("rm", url, "--shard", "train-000001", "--yes")
    assert open_cache(url).shard_names == ["train-000000", "train-000002"]  # the index still lists it
    old = cache.commits["train-000002"]
    rec = store.write_shard_data(url, "train-000002", *shard_contents(cache, "train-000002"), {})
    os.unlink(Path(url) / "commits" / f"{store.record_stem(old)}.json")
    assert store.commit_shard(url, rec)  # a new record under the same name: the index's copy is stale
    fresh = open_cache(url)
    assert fresh.commits["train-000002"]["path"] == rec["path"] != old["path"] and fresh.unindexed == 1
    (Path(url) / store.COMMIT_INDEX).write_text("{trunc")
    assert open_cache(url).shard_names == ["train-000000", "train-000002"]  # a damaged index is only a shortcut
    _, summary = extract(extract_cfg(train_spec, str(tmp_path / "root"), shards="0:3"), progress=False)
    assert summary["committed"] == ["train-000001"]
    assert open_cache(url).unindexed == 0  # the writer compacted the records again


@pytest.mark.slow
def test_a_hung_storage_server_times_out_with_a_message(tmp_path):
    """A server that accepts connections and never answers: timeouts and a bounded number of retries, then one
    line naming the URL, instead of botocore's minutes of silent waiting."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(1000)], daemon=True).start()
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "MDCACHE_STORAGE_TIMEOUT": "1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}"}
    p = run_cli("ls", "s3://team/hung", env=env, check=False)
    server.close()
    assert p.returncode == 2 and "cannot reach the storage (s3://team/hung)" in p.stderr
    assert "timeout" in p.stderr.lower() and "Traceback" not in p.stderr


def test_waiting_extractors_poll_adaptively():
    """A waiting extractor used to sleep ttl/4 (30 s) between looks: two extractors on a 4.5 s job took 40 s."""
    from itertools import islice

    from mdcache.extract import poll_delays

    first = list(islice(poll_delays(600), 12))
    assert first[0] == 1.0 and all(b >= a for a, b in zip(first, first[1:])) and max(first) == 30.0
    assert max(islice(poll_delays(8), 10)) == 2.0  # never longer than a quarter of the claim's life


def test_a_commit_whose_first_reply_was_lost_keeps_its_data(tmp_path, train_spec):
    """A retried commit is refused because its own first try landed: the data it names must stay (review
    finding: it was removed as a lost race, leaving a committed shard without data). A real lost race
    still removes the loser's copy, and a withdrawn record is dropped only if it still names the attempt."""
    url, _ = extract(extract_cfg(train_spec, str(tmp_path / "root"), shards="0:1"), progress=False)
    cache = open_cache(url)
    contents = shard_contents(cache, "train-000000")
    mine = store.write_shard_data(url, "train-000001", *contents, {})
    assert store.commit_shard(url, mine)  # the first try landed, its reply was lost
    assert store.publish(url, mine) is True and (Path(url) / mine["path"]).exists()
    loser = store.write_shard_data(url, "train-000001", *contents, {})
    assert store.publish(url, loser) is False and not (Path(url) / loser["path"]).exists()
    stem = store.record_stem(mine)
    assert stem == f"train-000001@{mine['views']}"  # one record per (shard, K): a shard grows by new records
    store.drop_commit(url, stem, loser["path"])  # names another attempt: left alone
    assert store.committed_path(url, stem) == mine["path"]
    store.drop_commit(url, stem, mine["path"])
    store.drop_commit(url, stem, mine["path"])  # twice (two repairing extractors): no error
    assert store.committed_path(url, stem) is None


def test_refused_credentials_are_recognised_by_their_error_code():
    """AWS words it 'Access Denied', not 'AccessDenied': the code in botocore's ClientError decides."""
    from botocore.exceptions import ClientError

    from mdcache.errors import storage_error

    for code, message in (("AccessDenied", "Access Denied"), ("InvalidAccessKeyId", "The AWS Access Key Id you "
                          "provided does not exist in our records."), ("SignatureDoesNotMatch", "no match")):
        try:
            try:
                raise ClientError({"Error": {"Code": code, "Message": message}}, "GetObject")
            except ClientError as e:
                raise PermissionError(message) from e  # what s3fs raises
        except PermissionError as e:
            err = storage_error(e, "s3://team/x")
        assert err is not None and "refused these credentials (s3://team/x)" in str(err), code
    assert storage_error(PermissionError("[Errno 13] Permission denied: '/root/x'"), None) is None


def test_records_under_paths_with_glob_characters_are_read(tmp_path):
    from mdcache.fs import read_json_many, url_to_fs

    d = tmp_path / "team[1]" / "commits"
    d.mkdir(parents=True)
    (d / "s.json").write_text('{"shard": "s"}')
    fs, path = url_to_fs(str(tmp_path / "team[1]"))
    got = read_json_many(fs, [f"{path}/commits/s.json", f"{path}/commits/gone.json"])
    assert list(got.values()) == [{"shard": "s"}]


def test_per_epoch_rows_reach_tensorboard_at_their_epoch(tmp_path):
    """finetune's rows have an epoch, no step: they must not all land at step 0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mdtrain.outputs import MetricsLog

    log = MetricsLog(str(tmp_path / "metrics.jsonl"), ("tensorboard",))
    for epoch in range(3):
        log.write({"epoch": epoch, "val_top1": 10.0 * epoch})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_top1")] == [(0, 0.0), (1, 10.0), (2, 20.0)]
