"""Caches that grow in views: K is not part of a cache's identity (format 2), so asking for more views of a
cache extends it, one new commit record per shard, and the result is byte for byte the cache a fresh
extraction with the larger K makes. Format-1 caches (K in the identity) still open and train."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TEACHER, TRAIN_FLAGS, extract_cfg, invoke, run_cli, shard_contents, verify_partial

from mdcache import open_cache, store, transcode, views
from mdcache.extract import extract
from mdcache.store import CacheError


def same_targets(a, b, views: int) -> None:
    """Every stored view of every shard of `b`: the same keys, view parameters and encoded arrays in `a`."""
    assert sorted(a.commits) == sorted(b.commits)
    for shard in b.commits:
        for v in range(views):
            ka, xa, pa = a.read_encoded(shard, v)
            kb, xb, pb = b.read_encoded(shard, v)
            assert ka == kb and np.array_equal(pa, pb), (shard, v)
            assert xa.keys() == xb.keys() and all(np.array_equal(xa[n], xb[n]) for n in xa), (shard, v)


@pytest.fixture(scope="module")
def grown(train_spec, tmp_path_factory):
    """K=2 on two shards, grown to K=8 (int8: a calibrated codec), and a fresh K=8 extraction elsewhere."""
    root, spec = tmp_path_factory.mktemp("grow"), two_shards(train_spec)
    small, _ = extract(extract_cfg(spec, str(root / "a"), codec="int8"), progress=False)
    before = {s: r["path"] for s, r in open_cache(small).commits.items()}
    url, summary = extract(extract_cfg(spec, str(root / "a"), views=8, codec="int8"), progress=False)
    fresh, _ = extract(extract_cfg(spec, str(root / "b"), views=8, codec="int8"), progress=False)
    return {"small": small, "url": url, "summary": summary, "fresh": fresh, "before": before, "root": root,
            "spec": spec}


def two_shards(train_spec: str) -> str:
    """Two of the demo's four shards: a complete cache (what training wants) that extracts in seconds."""
    return train_spec.replace("000003", "000001")


def test_growing_k_extends_the_same_cache(grown):
    assert grown["url"] == grown["small"]  # the same cache id: K is not part of what produced the targets
    assert grown["summary"]["grow"] == {"train-000000": 2, "train-000001": 2} and grown["summary"]["reused"] == 0
    cache = open_cache(grown["url"], records=True)
    assert cache.views == 8 and sorted(cache.records) == [
        "train-000000@2", "train-000000@8", "train-000001@2", "train-000001@8"]
    for shard, path in grown["before"].items():  # the K=2 data stays (a reader may be on it); the K=8 names it
        assert cache.records[f"{shard}@2"]["path"] == path and cache.commits[shard]["grows"] == path
        assert (Path(grown["url"]) / path).exists()
    assert run_cli("verify", grown["url"]).stdout.strip() == "OK"
    row = next(r for r in run_cli("ls", str(grown["root"] / "a")).stdout.splitlines() if cache.cache_id in r)
    assert " 8 " in row and "growing" not in row
    stats = cache.stats()  # what readers read (the K=8 records) and what is stored (the K=2 ones too)
    assert stats["bytes_stored"] > stats["bytes"] > 0
    assert "more in records superseded by growth" in " ".join(run_cli("info", grown["url"]).stdout.split())


def test_a_grown_cache_is_byte_identical_to_a_fresh_one(grown):
    a, b = open_cache(grown["url"]), open_cache(grown["fresh"])
    assert Path(grown["url"]).name == Path(grown["fresh"]).name
    # calibrated on the first two views of each image whatever K: growing keeps the calibration
    assert a.manifest["codec"]["calibration_sha256"] == b.manifest["codec"]["calibration_sha256"]
    same_targets(a, b, 8)


def test_asking_for_fewer_views_reuses_and_gc_keeps_every_grown_step(grown):
    url, summary = extract(extract_cfg(grown["spec"], str(grown["root"] / "a"), codec="int8", views=4),
                           progress=False)
    assert url == grown["url"] and summary["reused"] == 2 and not summary["committed"]
    assert "nothing to remove" in run_cli("gc", grown["url"], "--grace", "0").stdout


def test_gc_superseded_removes_what_growth_left_behind_once_the_wait_has_passed(grown, tmp_path, capsys):
    url = str(tmp_path / Path(grown["url"]).name)
    shutil.copytree(grown["url"], url)
    assert "superseded" not in run_cli("gc", url, "--superseded").stdout  # grown a moment ago: within the wait
    dry = run_cli("gc", url, "--superseded", "--superseded-after", "0").stdout
    assert dry.count("record superseded by") == 2 and dry.count("data of the superseded record") == 2
    assert len(open_cache(url, records=True).records) == 4  # a dry run
    # a reader that opened the cache before the growth: it holds the K=2 records
    before = open_cache(url)
    before.commits = {s: before.records[f"{s}@2"] for s in before.commits}
    # a shard whose newest attempt was lost keeps its older record (what extract resumes from)
    lost = open_cache(url, records=True).records["train-000001@8"]["path"]
    shutil.move(str(Path(url) / lost), str(tmp_path / "aside"))
    out = run_cli("gc", url, "--superseded", "--superseded-after", "0", "--yes").stdout
    assert "train-000000@2" in out and "train-000001@2" not in out
    shutil.move(str(tmp_path / "aside"), str(Path(url) / lost))
    run_cli("gc", url, "--superseded", "--superseded-after", "0", "--yes")
    cache = open_cache(url, records=True)
    assert sorted(cache.records) == ["train-000000@8", "train-000001@8"] and cache.views == 8
    assert not any((Path(url) / p).exists() for p in grown["before"].values())
    same_targets(cache, open_cache(grown["fresh"]), 8)  # what readers read is untouched
    assert cache.stats()["bytes_stored"] == cache.stats()["bytes"]
    assert run_cli("verify", url).stdout.strip() == "OK"
    index = json.loads((Path(url) / store.COMMIT_INDEX).read_text())
    assert sorted(index["records"]) == ["train-000000@8", "train-000001@8"]
    # the early reader's next read finds its record gone and reads the grown one: the same first views
    capsys.readouterr()
    keys, arrays, params = before.read_encoded("train-000000", 1)
    assert "superseded by growth and removed" in capsys.readouterr().err
    ref = open_cache(grown["fresh"]).read_encoded("train-000000", 1)
    assert keys == ref[0] and np.array_equal(params, ref[2])
    assert all(np.array_equal(arrays[n], ref[1][n]) for n in ref[1])


def test_a_half_grown_cache_reads_its_common_views_and_resumes(train_spec, tmp_path):
    """Growth stopped after one shard (a killed job, or --shards): readers see K=2 everywhere, and the next run
    grows only what is left. The first views of a grown shard are the ones it had."""
    root = str(tmp_path / "c")
    url, _ = extract(extract_cfg(train_spec, root, shards="0:2"), progress=False)
    extract(extract_cfg(train_spec, root, shards="0:1", views=3), progress=False)
    cache = open_cache(url)
    assert cache.views == 2 and cache.commits["train-000000"]["views"] == 3
    assert cache.commits["train-000001"]["views"] == 2
    assert "2-3 (growing) views" in " ".join(run_cli("info", url).stdout.split())
    old = open_cache(url).records["train-000000@2"]
    for v in range(2):
        keys, x, p = cache.read_encoded("train-000000", v)
        assert np.array_equal(x["targets"], _read_record(url, old, v)), v
    _, summary = extract(extract_cfg(train_spec, root, shards="0:2", views=3), progress=False)
    assert summary["reused"] == 1 and summary["grow"] == {"train-000001": 2}
    assert open_cache(url).views == 3


def _read_record(url: str, rec: dict, view: int) -> np.ndarray:
    import zarr

    return zarr.open_group(str(Path(url) / rec["path"]), mode="r")["targets"][view]


def test_growth_refuses_views_drawn_by_another_sampler(train_spec, tmp_path):
    """The stored views must be the first views the sampler draws now: a shard whose stored parameters differ
    (rewritten here as another sampler would have drawn them) is refused by name and nothing is committed."""
    root = str(tmp_path / "r")
    url, _ = extract(extract_cfg(train_spec, root, shards="0:1"), progress=False)
    cache = open_cache(url)
    keys, arrays, params = shard_contents(cache, "train-000000")
    params[..., 0] //= 2  # every crop box moved
    old = cache.commits["train-000000"]
    store.drop_commit(url, store.record_stem(old), old["path"])
    assert store.commit_shard(url, store.write_shard_data(url, "train-000000", keys, arrays, params, {}))
    _, summary = extract(extract_cfg(train_spec, root, shards="0:1", views=3), progress=False)
    assert "view parameters drawn now differ" in summary["failed"]["train-000000"]
    assert sorted(open_cache(url, records=True).records) == ["train-000000@2"]


def as_format_1(url: str) -> str:
    """Rewrite a cache as mdcache format 1 wrote it (K in the fingerprint, records commits/<shard>.json
    without a format_version, no index); returns its new URL (the id is the hash of the fingerprint)."""
    d = Path(url)
    m = json.loads((d / store.MANIFEST).read_text())
    fp = {**m["fingerprint"], "format_version": 1, "views": {**m["fingerprint"]["views"], "views": m["views"]}}
    m.update(format_version=1, fingerprint=fp, cache_id=store.cache_id(fp))
    (d / store.MANIFEST).write_text(json.dumps(m))
    for p in d.glob("commits/*.json"):
        rec = json.loads(p.read_text())
        rec.pop("format_version", None)
        p.unlink()
        (d / "commits" / f"{rec['shard']}.json").write_text(json.dumps(rec))
    (d / store.COMMIT_INDEX).unlink(missing_ok=True)
    new = d.parent / m["cache_id"]
    d.rename(new)
    return str(new)


def test_format_1_caches_still_open_and_read_but_never_grow(train_spec, tmp_path, capsys):
    url, _ = extract(extract_cfg(train_spec, str(tmp_path / "v1"), shards="0:1"), progress=False)
    expected = open_cache(url).read_encoded("train-000000", 1)
    old = as_format_1(url)
    cache = open_cache(old)
    assert cache.format_version == 1 and cache.views == 2 and sorted(cache.records) == ["train-000000"]
    keys, x, p = cache.read_encoded("train-000000", 1)
    assert keys == expected[0] and np.array_equal(x["targets"], expected[1]["targets"])
    verify_partial(old)
    # the same settings now name a format-2 cache (K left the identity): a new cache, the old one untouched
    capsys.readouterr()
    new, _ = extract(extract_cfg(train_spec, str(tmp_path / "v1"), shards="0:1", views=3), progress=False)
    assert new != old and open_cache(new).format_version == 2 and open_cache(old).views == 2
    said = " ".join(capsys.readouterr().err.split())  # the upgrade says where the old cache is, once
    assert said.count(f"note: {old} (format 1, 2 views) beside it was made by an earlier mdcache") == 1, said
    assert "cache ids changed since (format 2)" in said
    todo = [s for s in cache.sources() if s.name == "train-000000"]
    from mdcache.extract import resume

    with pytest.raises(CacheError, match="format-1 cache cannot grow"):
        resume(cache, todo, 3)


def test_an_upgrade_names_the_old_cache_and_what_differs(train_spec, tmp_path, capsys):
    """The usual upgrade: a format-1 cache made with the PIL replay (every cache before 0.2), then the same
    command with this release (the tensor replay by default): a new cache, and a note naming the old one and
    the view setting that differs. Another codec's old cache is not named."""
    root = str(tmp_path / "up")
    old = as_format_1(extract(extract_cfg(train_spec, root, shards="0:1", replay=views.REPLAY_PIL),
                              progress=False)[0])
    as_format_1(extract(extract_cfg(train_spec, root, shards="0:1", codec="int8", replay=views.REPLAY_PIL),
                        progress=False)[0])
    capsys.readouterr()
    new, _ = extract(extract_cfg(train_spec, root, shards="0:1"), progress=False)
    said = " ".join(capsys.readouterr().err.split())
    assert new != old and said.count("note:") == 1, said
    assert f"note: {old} (format 1, 2 views)" in said and "its view settings differ (replay)" in said


def test_a_transcoded_cache_grows_with_its_source(train_spec, tmp_path):
    """Transcode K=2 to int8, grow the source to K=4, transcode again: the same int8 cache grows (its
    calibration from the first two views), equal to transcoding the K=4 source afresh."""
    root = str(tmp_path / "t")

    def tc(src: str, out: str) -> tuple[str, dict]:
        return transcode.transcode(transcode.TranscodeConfig(src=src, codec="int8", root=out, device="cpu",
                                                             batch_size=16, calib_images=16), progress=False)

    src, _ = extract(extract_cfg(train_spec, root, shards="0:2"), progress=False)
    first, _ = tc(src, str(tmp_path / "t8"))
    extract(extract_cfg(train_spec, root, shards="0:2", views=4), progress=False)
    again, summary = tc(src, str(tmp_path / "t8"))
    assert again == first and summary["grow"] == {"train-000000": 2, "train-000001": 2}
    fresh, _ = tc(src, str(tmp_path / "fresh"))
    assert open_cache(again).views == 4
    same_targets(open_cache(again), open_cache(fresh), 4)


def student(url: str, out: Path, *flags: str) -> dict:
    from safetensors.torch import load_file

    r = invoke("pretrain", "--cache", url, *TRAIN_FLAGS, "--workers", "0", "--epochs", "3", "--stop-after", "6",
               "--out", out, *flags, module="mdtrain")
    assert r.exit_code == 0, r.stderr[-2000:]
    return load_file(str(out / "student.safetensors"))


def test_students_of_a_grown_and_a_fresh_cache_are_the_same(grown, tmp_path):
    """The proof that matters to a user: the same student, weight for weight, from the grown K=8 cache as
    from a fresh K=8 one; and --cache-views 2 of the grown cache trains the K=2 cache's student."""
    a, b = student(grown["url"], tmp_path / "grown"), student(grown["fresh"], tmp_path / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    k2, _ = extract(extract_cfg(grown["spec"], str(tmp_path / "k2"), codec="int8"), progress=False)
    c, d = student(grown["url"], tmp_path / "first2", "--cache-views", "2"), student(k2, tmp_path / "k2run")
    assert all(torch.equal(c[n], d[n]) for n in c) and not all(torch.equal(a[n], c[n]) for n in a)

    def stored_loss(url: str, *flags: str) -> dict:  # the loss on the crops it trained on: the first 2 views only
        r = invoke("distill-loss", "--ckpt", tmp_path / "first2" / "last.ckpt", "--teacher", TINY_TEACHER,
                   "--random-init", "--cache", url, "--batch-size", "8", "--workers", "0", *flags, module="mdtrain")
        assert r.exit_code == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])
    first2, of_k2 = stored_loss(grown["url"], "--cache-views", "2"), stored_loss(k2)
    assert first2["views"] == of_k2["views"] == 2 and first2["images"] == of_k2["images"]
    assert first2["loss"] == of_k2["loss"] != stored_loss(grown["url"])["loss"]
    r = invoke("distill-loss", "--ckpt", tmp_path / "first2" / "last.ckpt", "--teacher", TINY_TEACHER,
               "--source", grown["spec"], "--cache-views", "2", module="mdtrain")
    assert r.exit_code != 0 and "give --cache too" in r.stderr
    r = invoke("pretrain", "--cache", k2, *TRAIN_FLAGS, "--cache-views", "3", "--out", tmp_path / "no",
               module="mdtrain")
    assert r.exit_code != 0 and "stores 2 views per image" in r.stderr
    # a run that trained on 2 views does not resume on 8 because its cache grew meanwhile: the views of every
    # later epoch would change; it says how to resume
    again = ["--cache", grown["url"], *TRAIN_FLAGS, "--workers", "0", "--epochs", "3", "--stop-after", "2", "--out",
             tmp_path / "first2", "--resume", "auto"]
    r = invoke("pretrain", *again, module="mdtrain")
    assert r.exit_code == 2 and "resume with --cache-views 2" in r.stderr, r.stderr
    assert invoke("pretrain", *again, "--cache-views", "2", module="mdtrain").exit_code == 0


def test_a_shard_named_with_an_at_sign_opens_and_grows(demo_data, tmp_path):
    """Records are <shard>@<K>.json: a source shard whose own name holds '@' (img@2x-000000.tar) must still
    be read as its shard, not as 'img' (a reviewer found caches of such sources unreadable)."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(demo_data / "train-000000.tar", src / "img@2x-000000.tar")
    spec = str(src / "img@2x-000000.tar")
    url, _ = extract(extract_cfg(spec, str(tmp_path / "root")), progress=False)
    assert open_cache(url, records=True).shard_names == ["img@2x-000000"]
    extract(extract_cfg(spec, str(tmp_path / "root"), views=3), progress=False)
    cache = open_cache(url, records=True)
    assert sorted(cache.records) == ["img@2x-000000@2", "img@2x-000000@3"] and cache.views == 3
    assert store.shard_of("img@2x-000000@3") == "img@2x-000000" and store.shard_of("img@2x-000000") == "img@2x-000000"
    assert run_cli("verify", url).stdout.strip() == "OK"


def test_a_grown_shard_that_lost_all_its_data_is_computed_again_in_one_run(train_spec, tmp_path):
    """Both records of a grown shard name deleted data: one extract withdraws both and computes the shard
    (withdrawing only the newest would try to grow from the lost K=2 data and fail)."""
    import shutil

    spec = two_shards(train_spec)
    url, _ = extract(extract_cfg(spec, str(tmp_path), shards="0:1"), progress=False)
    extract(extract_cfg(spec, str(tmp_path), shards="0:1", views=3), progress=False)
    for rec in open_cache(url, records=True).records.values():
        shutil.rmtree(Path(url) / rec["path"])
    _, summary = extract(extract_cfg(spec, str(tmp_path), shards="0:1", views=3), progress=False)
    assert summary["committed"] == ["train-000000"] and not summary["failed"] and not summary["grow"]
    assert open_cache(url).commits["train-000000"]["views"] == 3
