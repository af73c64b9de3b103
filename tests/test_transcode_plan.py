"""int4 and pca:R caches end to end, `mdcache transcode` (local; the S3 form is in test_s3) and `mdcache plan`
against real caches' sizes. Real extractor, real tiny open_clip teacher (random init), real Zarr stores."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, TRAIN_FLAGS, make_cache, run_cli, shared_cache

from mdcache import codecs, plan, store, transcode
from mdcache.errors import CacheError, ConfigError

PCA = "pca:16"  # of the tiny teacher's 64 channels


def fidelity(a, b):
    m = codecs.FidelityMeter()
    m.update(torch.from_numpy(a), torch.from_numpy(b))
    return m.report()


@pytest.fixture(scope="module")
def fp16_cache(tmp_path_factory, train_spec):
    return shared_cache(tmp_path_factory, train_spec, "fp16")


def tc(src, codec, root, **kw):
    url, summary = transcode.transcode(transcode.TranscodeConfig(src=src, codec=codec, root=str(root), device="cpu",
                                                                 batch_size=8, calib_images=16, **kw), progress=False)
    assert not summary["failed"], summary
    return url, summary


@pytest.mark.parametrize("codec", ["int4", PCA])
def test_transcode_keeps_keys_and_views_and_names_its_source(fp16_cache, tmp_path, codec):
    src = store.open_cache(fp16_cache)
    url, summary = tc(fp16_cache, codec, tmp_path)
    new = store.open_cache(url)
    assert new.complete and new.codec == codec and len(summary["committed"]) == len(src.commits)
    fp = new.manifest["fingerprint"]
    assert fp["transcoded_from"] == {"cache_id": src.cache_id, "codec": "fp16"}
    assert fp["codec"] == {**codecs.get_codec(codec).identity, "calib_images": 16}  # not the default 64: named
    assert {k: v for k, v in fp.items() if k not in ("codec", "transcoded_from")} == \
        {k: v for k, v in src.manifest["fingerprint"].items() if k != "codec"}
    assert new.cache_id == store.cache_id(fp) != src.cache_id
    for shard in src.shard_names:
        for v in range(src.views):
            k0, t0, p0 = src.read(shard, v)
            k1, t1, p1 = new.read(shard, v)
            assert k0 == k1 and np.array_equal(p0, p1)  # same keys, same view parameters
            assert fidelity(t0, t1)["mean_cosine"] > (0.99 if codec == "int4" else 0.9)
    # the recorded fidelity is measured against the decoded source, per shard
    rec = next(iter(new.commits.values()))
    assert rec["fidelity"]["tokens"] > 0 and rec["fidelity"]["mean_cosine"] < 1
    # a second run is a resume: nothing recomputed, same URL
    again, summary = tc(fp16_cache, codec, tmp_path)
    assert again == url and summary["reused"] == len(src.commits) and not summary["committed"]


def test_transcode_from_int8_matches_a_direct_int4_extraction(tmp_path_factory, train_spec, tmp_path):
    """int8 -> int4 is nearly what extracting int4 gives (the int8 step costs almost nothing)."""
    int8 = shared_cache(tmp_path_factory, train_spec, "int8")
    url, _ = tc(int8, "int4", tmp_path / "t")
    direct = make_cache(tmp_path / "d", train_spec, codec="int4")
    a, b = store.open_cache(url), store.open_cache(direct)
    shard = a.shard_names[0]
    ta, tb = a.read(shard, 0)[1], b.read(shard, 0)[1]
    assert fidelity(ta, tb)["mean_cosine"] > 0.99


def test_transcode_refuses_what_it_cannot_do(fp16_cache, tmp_path):
    with pytest.raises(ConfigError, match="already fp16"):
        tc(fp16_cache, "fp16", tmp_path)
    with pytest.raises(ConfigError, match="unknown codec"):
        tc(fp16_cache, "int3", tmp_path)
    with pytest.raises(CacheError, match="nothing: no manifest.json here"):
        tc(str(tmp_path / "nothing"), "int4", tmp_path)


def test_transcode_cli_partial_then_resume_and_last_line_is_the_url(fp16_cache, tmp_path):
    p = run_cli("transcode", fp16_cache, "--codec", "int4", "--root", str(tmp_path), "--shards", "0:1")
    url = p.stdout.strip().splitlines()[-1]
    assert store.open_cache(url).shard_names == [store.open_cache(fp16_cache).shard_names[0]]
    p = run_cli("transcode", fp16_cache, "--codec", "int4", "--cache", str(tmp_path))
    assert p.stdout.strip().splitlines()[-1] == url and "reused 1" in p.stderr
    assert store.open_cache(url).complete
    info = run_cli("info", url).stdout
    assert "transcoded from fp16 cache" in info and "codec int4" in info


def test_two_concurrent_transcoders_commit_each_shard_once(fp16_cache, tmp_path):
    cmd = [sys.executable, "-m", "mdcache", "transcode", fp16_cache, "--codec", PCA, "--cache", str(tmp_path),
           "--device", "cpu"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    urls = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(urls) == 1
    cache = store.open_cache(urls.pop())
    assert cache.complete
    attempts = os.listdir(os.path.join(cache.url, "shards"))
    assert sorted(a.rsplit(".", 1)[0] for a in attempts) == sorted(cache.commits)  # no orphan attempt left
    assert len(os.listdir(os.path.join(cache.url, "calibration"))) in (1, 2)  # content-addressed: never overwritten
    # what a creator that lost the manifest race leaves: gc removes it, never the basis the manifest names
    store.put_calibration(cache.url, {"basis": np.ones((2, 64), np.float32)})
    run_cli("gc", str(tmp_path), "--grace", "0", "--yes")
    assert os.listdir(os.path.join(cache.url, "calibration")) == [
        cache.manifest["codec"]["calibration"]["basis"]["array"].rsplit("/", 1)[-1]]
    run_cli("verify", cache.url)


def test_pca_cache_reports_explained_variance_and_checks_its_basis(tmp_path, train_spec):
    url = make_cache(tmp_path, train_spec, codec=PCA)
    info = run_cli("info", url).stdout
    assert "explained variance" in info and "16:" in info
    cache = store.open_cache(url)
    ref = cache.manifest["codec"]["calibration"]["basis"]
    assert ref["shape"] == [16, 64] and ref["array"].startswith("calibration/basis-")
    # a damaged basis is caught before any target decodes with it
    import zarr

    z = zarr.open_array(os.path.join(url, ref["array"]), mode="r+")
    z[0, 0] = z[0, 0] + 1
    with pytest.raises(CacheError, match="does not match its checksum"):
        store.open_cache(url).read(cache.shard_names[0], 0)
    p = run_cli("pretrain", "--cache", url, "--out", str(tmp_path / "pt"), "--epochs", "1", *TRAIN_FLAGS,
                module="mdtrain", check=False)
    assert p.returncode == 2 and "calibration array" in p.stderr, p.stderr
    p = run_cli("verify", url, check=False)
    assert p.returncode == 2 and "calibration array" in p.stderr, p.stderr


def chunk_bytes(url: str) -> int:
    """Bytes of the shards' array data (not the Zarr metadata, which plan leaves out)."""
    total = 0
    for d, _, files in os.walk(os.path.join(url, "shards")):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files if f != "zarr.json")
    return total


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4", PCA])
def test_plan_predicts_real_cache_sizes(tmp_path_factory, train_spec, fp16_cache, codec):
    url = fp16_cache if codec == "fp16" else tc(fp16_cache, codec, tmp_path_factory.mktemp("plan"))[0]
    cache = store.open_cache(url)
    samples = sum(r["samples"] for r in cache.commits.values())
    real = chunk_bytes(url) / (samples * cache.views)
    tokens, dim = cache.manifest["teacher"]["tokens"], cache.teacher_dim
    p = plan.plan(plan.PlanConfig(images=samples, views=cache.views, codec=codec, teacher="x", tokens=tokens, dim=dim))
    assert p["cache_bytes"] == p["bytes_per_view"] * samples * cache.views
    assert 0.75 * p["bytes_per_view"] <= real <= 1.01 * p["bytes_per_view"], (real, p["bytes_per_view"])


def test_plan_cli_table_and_bench_file(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"extract_ips": 800.0, "views": 8, "teacher": "clip-b16", "device": "cuda",
                                 "precision": "bf16", "codec": "int8"}))
    p = run_cli("plan", "--images", "1281167", "--views", "16", "--codec", "int4", "--bench", str(bench), "--json")
    r = json.loads(p.stdout)
    d, t = 768, 196
    assert r["bytes_per_view"] == t * (d // 2 + 2) + 44
    assert r["cache_bytes"] == r["bytes_per_view"] * 16 * 1281167
    assert r["read_bytes_per_s"] == r["bytes_per_view"] * 3000
    assert r["extract_seconds"] == pytest.approx(1281167 / (800.0 * 8 / 16))
    assert r["table"]["int8"]["8"] == (t * (d + 4) + 44) * 8 * 1281167
    text = run_cli("plan", "--codec", "pca:192").stdout
    assert "pca:192" in text and "K=16" in text and "TB" in text
    p = run_cli("plan", "--teacher", "mine", check=False)
    assert p.returncode == 2 and "--tokens and --dim" in p.stderr


def test_plan_prices_a_second_teacher_on_the_same_views():
    r = json.loads(run_cli("plan", "--images", "1000", "--views", "4", "--add-teacher", "clip-l14", "--json").stdout)
    second = r["second_teacher"]
    assert second["bytes_per_view"] == 256 * (1024 + 4) + 44  # int8 codes + a per-token scale, + view params
    assert second["cache_bytes"] == second["bytes_per_view"] * 4 * 1000
    assert second["total_bytes"] == r["cache_bytes"] + second["cache_bytes"]
    assert second["read_bytes_per_s"] == (r["bytes_per_view"] + second["bytes_per_view"]) * 3000
    cnn = json.loads(run_cli("plan", "--add-teacher", "49x512", "--json").stdout)["second_teacher"]
    assert (cnn["tokens"], cnn["dim"]) == (49, 512)
    assert "+ teacher   49x512 on the same views" in run_cli("plan", "--add-teacher", "49x512").stdout
    p = run_cli("plan", "--add-teacher", "resnet", check=False)
    assert p.returncode == 2 and "TOKENSxDIM" in p.stderr


def test_a_codec_that_cannot_fit_the_teacher_is_refused_before_a_cache_exists(tmp_path, train_spec):
    """int4 on a teacher with an odd channel count (a real timm ViT, 33 channels): one line, and no manifest
    left behind that no extractor could ever fill."""
    p = run_cli("extract", "--source", train_spec, "--cache", str(tmp_path), "--teacher", "timm:vit_tiny_patch16_224",
                "--teacher-arg", "embed_dim=33", "--teacher-arg", "num_heads=3", "--teacher-arg", "depth=1",
                "--random-init", "--image-size", "32", "--codec", "int4", "--workers", "0", check=False)
    assert p.returncode == 2 and "channels are odd" in p.stderr, p.stderr
    assert not any(tmp_path.iterdir())


def test_transcode_puts_the_new_cache_beside_the_source(fp16_cache, monkeypatch):
    root, cache_id = os.path.split(fp16_cache)
    monkeypatch.chdir(root)
    assert transcode.default_root(cache_id) == transcode.default_root(cache_id + "/") == root
    assert transcode.default_root("s3://team/mdcache/0123abcd/") == "s3://team/mdcache"
