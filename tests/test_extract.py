"""mdcache extract end to end: real photos, a real (tiny, random-init) open_clip ViT, real Zarr stores."""
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_CLIP, TINY_TEACHER, extract_cfg, run_cli, shard_contents, verify_partial

from mdcache import open_cache, store, views
from mdcache.errors import ConfigError
from mdcache.extract import extract
from mdcache.sources import iter_samples, list_source
from mdcache.teachers import load_teacher, run_teacher


def teacher_on_replayed_views(cache, source_spec):
    """Run the teacher directly on every stored view, replayed from the source images."""
    t = load_teacher(TINY_TEACHER, random_init=True, image_size=64)
    shards = {s.name: s for s in list_source(source_spec)}
    for name in cache.shard_names:
        images = {s.key: views.decode_image(s.data) for s in iter_samples(shards[name])}
        for v in range(cache.manifest["views"]):
            keys, targets, params = cache.read(name, v)
            x = torch.stack([views.view_pixels(images[k], p, 64, cache.replay) for k, p in zip(keys, params)])
            yield run_teacher(t, x), torch.from_numpy(targets)


@pytest.mark.cuda  # on a GPU: extraction there (pinned uint8 batches, 2 workers), the check on the CPU
@pytest.mark.parametrize("codec,threshold", [("fp16", 0.9999), ("int8", 0.999)])
def test_cache_equals_teacher_on_replayed_views(tmp_path, train_spec, codec, threshold):
    url, summary = extract(extract_cfg(train_spec, str(tmp_path), codec=codec, workers=2), progress=False)
    cache = open_cache(url)
    assert cache.complete and len(cache.shard_names) == 4 and summary["images"] == 120
    from mdcache.codecs import FidelityMeter
    meter = FidelityMeter()
    for fresh, stored in teacher_on_replayed_views(cache, train_spec):
        meter.update(fresh, stored)
    rep = meter.report()
    assert rep["tokens"] == 120 * 2 * 16
    assert rep["min_cosine"] > threshold, rep
    recorded = cache.stats()["fidelity"]  # the fidelity recorded while extracting agrees
    assert recorded["min_cosine"] > threshold and recorded["tokens"] > 0


def cache_url_for(tmp_path, source, **kw):
    """Create (only) the cache's manifest: `--shards 0:0` selects no shard to compute."""
    url, _ = extract(extract_cfg(source, str(tmp_path), **{"shards": "0:0", **kw}), progress=False)
    return url.rsplit("/", 1)[-1]


def test_cache_id_changes_with_what_produced_it_and_nothing_else(tmp_path, demo_data, train_spec):
    base = cache_url_for(tmp_path, train_spec)
    # Not part of the identity: how the work is run.
    assert cache_url_for(tmp_path, train_spec, workers=2, batch_size=3, fidelity_images=2) == base
    assert cache_url_for(tmp_path, train_spec, shards="1:2") == base
    assert cache_url_for(tmp_path, train_spec, views=3) == base  # K: a cache grows (tests/test_grow.py)
    # Part of it: teacher, tap, codec, view recipe, source.
    changed = {
        "teacher": cache_url_for(tmp_path, train_spec, teacher="timm:vit_tiny_patch16_224"),
        "tap": cache_url_for(tmp_path, train_spec, tap="proj"),
        "codec": cache_url_for(tmp_path, train_spec, codec="int8"),
        "crop": cache_url_for(tmp_path, train_spec, crop_scale=(0.3, 1.0)),
        "seed": cache_url_for(tmp_path, train_spec, seed=1),
        "jitter": cache_url_for(tmp_path, train_spec, color_jitter=0.0),  # 0.4 is the default
        "source": cache_url_for(tmp_path, str(demo_data / "train-{000000..000002}.tar")),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed


def commits_and_data(url):
    cache = open_cache(url)
    out = {}
    for name in cache.shard_names:
        rec = dict(cache.commits[name])
        out[name] = {"checksums": rec["checksums"], "keys": rec["keys_sha256"], "samples": rec["samples"],
                     "data": [cache.read_encoded(name, v) for v in range(rec["views"])]}
    return cache, out


def assert_same_cache(url_a, url_b):
    ca, a = commits_and_data(url_a)
    cb, b = commits_and_data(url_b)
    assert ca.manifest["fingerprint"] == cb.manifest["fingerprint"]
    assert ca.manifest["codec"] == cb.manifest["codec"]  # same calibration
    assert sorted(a) == sorted(b) and ca.complete and cb.complete
    for name in a:
        assert a[name]["checksums"] == b[name]["checksums"] and a[name]["keys"] == b[name]["keys"]
        for (ka, arr_a, va), (kb, arr_b, vb) in zip(a[name]["data"], b[name]["data"]):
            assert ka == kb and np.array_equal(va, vb)
            assert all(np.array_equal(arr_a[k], arr_b[k]) for k in arr_a)


def extract_args(source, cache, *extra):
    return ["extract", "--source", source, "--root", cache, "--teacher", TINY_TEACHER, "--random-init",
            "--image-size", "64", "--views", "2", "--codec", "int8", "--workers", "0", "--batch-size", "2",
            "--calib-images", "8", "--folder-shard-size", "10", *extra]


@pytest.fixture(scope="module")
def folder_source(demo_data, tmp_path_factory) -> Path:
    """The demo photos as a class-folder tree (class = photo name)."""
    root = tmp_path_factory.mktemp("folder")
    for shard in list_source(str(demo_data / "train-{000000..000003}.tar")):
        for s in iter_samples(shard):
            cls = s.key.rsplit("-", 1)[0]
            (root / cls).mkdir(exist_ok=True)
            (root / cls / f"{s.key}.jpg").write_bytes(s.data)
    return root


@pytest.mark.slow
def test_killed_run_then_rerun_equals_uninterrupted_run(tmp_path, folder_source):
    killed_root, clean_root = str(tmp_path / "killed"), str(tmp_path / "clean")
    proc = subprocess.Popen([sys.executable, "-m", "mdcache", *extract_args(str(folder_source), killed_root)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, killed_at = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        commits = list(Path(killed_root).glob("*/commits/*.json"))
        if len(commits) >= 2:
            proc.send_signal(signal.SIGKILL)
            killed_at = len(commits)
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None, "extraction finished before it could be killed; make the test slower"
    url = next(Path(killed_root).glob("*/manifest.json")).parent
    partial = open_cache(str(url))
    assert not partial.complete, "the kill should have left shards to do"
    rerun = run_cli(*extract_args(str(folder_source), killed_root))
    assert "reusing" in rerun.stderr and rerun.stdout.strip().endswith(url.name)
    clean = run_cli(*extract_args(str(folder_source), clean_root))
    assert clean.stdout.strip().splitlines()[-1].endswith(url.name)  # the last line printed is the cache URL
    assert_same_cache(str(url), clean.stdout.strip().splitlines()[-1])


def test_uncommitted_shard_data_is_invisible(tmp_path, train_spec):
    url, _ = extract(extract_cfg(train_spec, str(tmp_path)), progress=False)
    cache = open_cache(url)
    rec = cache.commits["train-000001"]
    # A crashed writer leaves data without a commit record: readers must not see it.
    shutil.copytree(Path(url) / rec["path"], Path(url) / "shards" / "train-000001.crashedattempt")
    os.unlink(Path(url) / "commits" / f"{store.record_stem(rec)}.json")
    cache = open_cache(url)
    assert "train-000001" not in cache.shard_names and not cache.complete
    with pytest.raises(store.CacheError, match="train-000001.*not committed"):
        cache.read("train-000001", 0)
    # Re-running redoes exactly that shard and reproduces the same bytes.
    _, summary = extract(extract_cfg(train_spec, str(tmp_path)), progress=False)
    assert summary["committed"] == ["train-000001"] and summary["reused"] == 3
    assert open_cache(url).commits["train-000001"]["checksums"] == rec["checksums"]


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_corrupt_and_missing_inputs_are_reported(tmp_path, demo_data):
    good = [(s.key, s.data) for s in iter_samples(list_source(str(demo_data / "train-000000.tar"))[0])][:6]
    src = tmp_path / "src"
    src.mkdir()
    members = [(f"{k}.jpg", d) for k, d in good[:3]]
    members += [("broken.jpg", good[3][1][: len(good[3][1]) // 3]), ("noimage.cls", b"3"),
                ("garbage.png", b"not a png at all")]
    write_tar(src / "bad-000000.tar", members + [(f"{k}.jpg", d) for k, d in good[4:]])
    write_tar(src / "bad-000001.tar", [(f"{k}.jpg", d) for k, d in good])
    full = (src / "bad-000001.tar").read_bytes()
    (src / "bad-000002.tar").write_bytes(full[: len(full) // 2])  # truncated mid-member
    p = run_cli(*extract_args(str(src / "bad-{000000..000002}.tar"), str(tmp_path / "c")), check=False)
    assert p.returncode == 1, p.stderr
    assert "bad-000002" in p.stderr and "truncated" in p.stderr
    cache = open_cache(p.stdout.strip().splitlines()[-1])
    assert cache.shard_names == ["bad-000000", "bad-000001"]  # the good shards are kept
    rec = cache.commits["bad-000000"]
    skipped = {s["key"]: s["error"] for s in rec["skipped"]}
    assert set(skipped) == {"broken", "noimage", "garbage"} and "no image member" in skipped["noimage"]
    assert rec["samples"] == 5 and "broken" not in cache.keys("bad-000000")
    assert cache.stats()["skipped"] == 3
    missing = run_cli(*extract_args(str(src / "bad-{000000..000005}.tar"), str(tmp_path / "c")), check=False)
    assert missing.returncode == 2 and "bad-000003.tar" in missing.stderr
    assert "3 source shards do not exist" in missing.stderr


def test_verify_checksums_and_teacher(tmp_path, train_spec):
    url, _ = extract(extract_cfg(train_spec, str(tmp_path), codec="int8"), progress=False)
    ok = run_cli("verify", url, "--teacher-check", "12")
    assert ok.stdout.strip() == "OK" and "teacher check on 12 replayed views" in ok.stderr
    narrow = run_cli("verify", url, env={"COLUMNS": "40"})  # a log file or a narrow terminal: lines stay whole
    assert any("shards committed, checksums OK" in line and url in line for line in narrow.stderr.splitlines())
    chunk = Path(url) / open_cache(url).commits["train-000002"]["path"] / "targets" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    bad = run_cli("verify", url, check=False)
    assert bad.returncode == 1 and bad.stdout.strip() == "FAILED"
    assert "train-000002" in bad.stderr and "view 1" in bad.stderr
    with pytest.raises(store.CacheError, match="train-000002"):
        open_cache(url).read("train-000002", 1)


def test_verify_teacher_check_catches_views_that_do_not_match(tmp_path, train_spec):
    """Negative control: a shard whose stored view params were altered but whose checksums are consistent
    (a new attempt, a new commit record) passes the checksum check and must fail the teacher check."""
    url, _ = extract(extract_cfg(train_spec, str(tmp_path), shards="0:1"), progress=False)
    cache = open_cache(url)
    name = "train-000000"
    keys, arrays, params = shard_contents(cache, name)
    params[..., 4] = 1 - params[..., 4]  # every view's flip state toggled
    params[..., 0] //= 2  # and its crop box moved up
    rec = store.write_shard_data(url, name, keys, arrays, params, {})
    os.unlink(Path(url) / "commits" / f"{store.record_stem(cache.commits[name])}.json")
    assert store.commit_shard(url, rec)
    verify_partial(url)  # checksums alone cannot tell
    bad = run_cli("verify", url, "--teacher-check", "8", check=False)
    assert bad.returncode == 1 and bad.stdout.strip() == "FAILED", bad.stderr  # a problem outranks INCOMPLETE
    assert "problem: teacher check: worst token cosine" in bad.stderr


def test_verify_refuses_another_teacher(tmp_path, train_spec):
    import open_clip
    from safetensors.torch import save_file

    open_clip.add_model_config(TINY_CLIP)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = open_clip.create_model("tiny-clip")
        paths.append(str(tmp_path / f"w{seed}.safetensors"))
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, paths[-1])
    url, _ = extract(extract_cfg(train_spec, str(tmp_path / "c"), random_init=False, teacher_weights=paths[0],
                                 shards="0:1"),
                     progress=False)
    verify_partial(url, "--teacher-check", "4", "--teacher-weights", paths[0])
    other = run_cli("verify", url, "--teacher-check", "4", "--teacher-weights", paths[1], check=False)
    assert other.returncode == 2 and "made by another teacher" in other.stderr
    nope = run_cli("verify", url, "--teacher-check", "4", check=False)
    assert nope.returncode == 2 and "--teacher-weights" in nope.stderr


def test_folder_source_virtual_shards(tmp_path, folder_source):
    p = run_cli(*extract_args(str(folder_source), str(tmp_path), "--shards", "0:3"))
    cache = open_cache(p.stdout.strip().splitlines()[-1])
    assert cache.shard_names == ["folder-000000", "folder-000001", "folder-000002"]
    assert len(cache.source_shards) == 12 and not cache.complete
    assert cache.manifest["source"]["classes"][:2] == ["astronaut", "camera"]
    assert cache.keys("folder-000000")[0] == "astronaut/astronaut-000"
    # the end-of-run line says how fast it went and how much of that the teacher spent waiting for the workers
    assert re.search(r"committed 3 shard\(s\), \d+ images in \d+s \([\d.]+ img/s, waiting for the input \d+% of "
                     r"it\)", p.stderr), p.stderr


def test_info_and_ls(tmp_path, train_spec):
    url, _ = extract(extract_cfg(train_spec, str(tmp_path), codec="int8", shards="0:2"), progress=False)
    info = run_cli("info", url).stdout
    assert "2/4 shards" in info and "int8" in info and "random-init" in info and "cos 0.99" in info
    as_json = json.loads(run_cli("info", url, "--json").stdout)
    assert as_json["stats"]["samples"] == 60 and as_json["stats"]["bytes_per_view"] > 0
    partial = run_cli("verify", url, check=False)  # checksums fine, but a trainer would refuse it
    assert partial.returncode == 1 and partial.stdout.strip() == "INCOMPLETE" and "train-000002" in partial.stderr
    ls = run_cli("ls", str(tmp_path)).stdout
    assert url.rsplit("/", 1)[-1] in ls and "2/4" in ls
    narrow = run_cli("ls", str(tmp_path), env={"COLUMNS": "80"}).stdout  # the id is pasted into `info`: never cut
    assert url.rsplit("/", 1)[-1] in narrow and max(len(line) for line in narrow.splitlines()) <= 80
    assert "\u2026" not in narrow and "int8" in narrow and " 60 " in narrow  # fewer columns, none cut to "t\u2026"
    assert run_cli("info", str(tmp_path), check=False).returncode == 2


def test_a_copy_of_a_pca_cache_takes_its_basis(tmp_path, train_spec):
    """bench-storage's local reference copy once left out calibration/ (pca's basis): the copy did not open.
    The store names every file a reader needs; the copy reads exactly like the original."""
    from mdtrain.bench_storage import copy_cache

    url, _ = extract(extract_cfg(train_spec, str(tmp_path / "a"), codec="pca:16", shards="0:1"), progress=False)
    cache = open_cache(url)
    files = store.committed_files(cache)
    assert any(f.startswith("calibration/") for f in files) and "commits/train-000000@2.json" in files
    copy = open_cache(copy_cache(cache, str(tmp_path / "copy")))
    assert copy.cache_id == cache.cache_id and copy.url != cache.url
    for a, b in zip(cache.read("train-000000", 1), copy.read("train-000000", 1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_weights_say_how_to_provide_them(tmp_path, train_spec):
    p = run_cli("extract", "--source", train_spec, "--root", str(tmp_path), "--teacher", "clip-b16", check=False,
                env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "--teacher-weights PATH" in p.stderr and "--random-init" in p.stderr
    assert "Traceback" not in p.stderr and "unreachable or offline mode is set" in p.stderr
    # No offline flag, a hub that refuses connections: the same message at once, not a minute of retries
    # (whose warnings used to be printed twice before it)
    dead = run_cli("extract", "--source", train_spec, "--root", str(tmp_path), "--teacher", "clip-b16", check=False,
                   env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    assert dead.returncode == 2 and "Hub (http://127.0.0.1:9) is unreachable" in dead.stderr
    assert "Connection refused" not in dead.stderr and "WARNING" not in dead.stderr


def test_bench_prints_both_rates_and_ratio(train_spec):
    p = run_cli("bench", "--source", train_spec, "--teacher", TINY_TEACHER, "--random-init", "--image-size", "64",
                "--shards", "0:2", "--workers", "1", "--calib-images", "8")
    out = p.stdout
    assert "teacher forward only" in out and "full extraction" in out
    assert "images: 60 x 2 views (60 extracted)" in out  # both runs saw every image of the 2 shards
    ratio = float(out.split("ratio extraction/teacher-only:")[1].split()[0])
    assert math.isfinite(ratio) and ratio > 0
    share = float(out.split("claims + commit records:")[1].split("%")[0]) / 100
    assert 0 < share < 1  # a share of the shard time, measured
    few = run_cli("bench", "--source", train_spec, "--teacher", TINY_TEACHER, "--random-init", "--image-size", "64",
                  "--shards", "0:2", "--workers", "1", "--calib-images", "8", "--teacher-batches", "1").stdout
    timed = int(re.search(r"images: (\d+) x 2 views \(60 extracted\)", few).group(1))
    assert 0 < timed < 60  # the teacher alone timed on the first shard's batch only; extraction on both shards


def test_bench_without_teacher_measures_the_cpu_side_per_core(train_spec):
    p = run_cli("bench", "--no-teacher", "--source", train_spec, "--teacher", TINY_TEACHER, "--image-size", "64",
                "--shards", "0:2", "--workers", "1", "--calib-images", "8")
    assert "images: 60 x 2 views" in p.stdout and "teacher forward only" not in p.stdout
    total, cores, per_core, views = re.search(r"no teacher: +([\d.]+) images/s on (\d+) cores = ([\d.]+) images/s "
                                              r"\(([\d.]+) views/s\) per core", p.stdout).groups()
    assert float(total) > 0 and math.isclose(float(total) / int(cores), float(per_core), rel_tol=0.01)
    assert math.isclose(float(views), 2 * float(per_core), rel_tol=0.01)


def test_color_jitter_views_are_replayed_exactly(tmp_path, train_spec):
    """With --color-jitter the stored factors travel with the crop: the teacher check must still match."""
    url, _ = extract(extract_cfg(train_spec, str(tmp_path), color_jitter=0.4, shards="0:1"), progress=False)
    cache = open_cache(url)
    assert cache.manifest["fingerprint"]["views"]["color_jitter"] == 0.4
    _, _, params = cache.read("train-000000", 1)
    assert (params[:, 7:10] != views.JITTER_SCALE).any()
    ok = verify_partial(url, "--teacher-check", "8")
    tc = float(ok.stderr.split("worst")[1].split()[0].rstrip(","))
    assert tc > 0.9999


def test_views_replayed_on_the_device_give_the_same_cache(tmp_path, train_spec):
    """--replay-on device: workers only decode, the teacher's device crops, resizes and jitters. The cache is
    the same one (where views are replayed is not part of its identity), byte for byte on the CPU."""
    a, _ = extract(extract_cfg(train_spec, str(tmp_path / "a"), shards="0:1", color_jitter=0.4), progress=False)
    b, _ = extract(extract_cfg(train_spec, str(tmp_path / "b"), shards="0:1", color_jitter=0.4, replay_on="device",
                               workers=1), progress=False)
    assert a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]
    ca, cb = open_cache(a), open_cache(b)
    assert ca.commits["train-000000"]["checksums"] == cb.commits["train-000000"]["checksums"]
    with pytest.raises(ConfigError, match="--replay-on device needs the tensor replay"):
        extract(extract_cfg(train_spec, str(tmp_path / "c"), shards="0:1", replay_on="device",
                            replay="pil-rgb-crop-bicubic-flip-enhance-v1"), progress=False)


def test_views_decoded_on_the_device_give_the_same_cache_and_skip_the_same_images(tmp_path, demo_data):
    """--replay-on device-decode: workers ship the files, the device decodes (torchvision; on a CPU the same
    libjpeg-turbo as PIL) and replays. The same cache, byte for byte; a truncated JPEG, found only on the device,
    is skipped by name as the workers skip it, and the batch it was in is kept."""
    good = [(s.key, s.data) for s in iter_samples(list_source(str(demo_data / "train-000000.tar"))[0])][:10]
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "mixed-000000.tar", [(f"{k}.jpg", d) for k, d in good[:3]] +
              [("broken.jpg", good[3][1][: len(good[3][1]) // 3]), ("garbage.png", b"not a png at all")] +
              [(f"{k}.jpg", d) for k, d in good[4:]])
    made = {}
    for where in ("workers", "device-decode"):
        url, _ = extract(extract_cfg(str(src / "mixed-000000.tar"), str(tmp_path / where), color_jitter=0.4,
                                     replay_on=where, workers=1, batch_size=4), progress=False)
        made[where] = open_cache(url)
    a, b = made["workers"], made["device-decode"]
    assert a.cache_id == b.cache_id and b.manifest["fingerprint"]["views"].get("decoder") is None  # a CPU: no nvJPEG
    ra, rb = a.commits["mixed-000000"], b.commits["mixed-000000"]
    assert ra["checksums"] == rb["checksums"] and a.keys("mixed-000000") == b.keys("mixed-000000")
    skipped = {s["key"]: s["error"] for s in rb["skipped"]}
    assert set(skipped) == {s["key"] for s in ra["skipped"]} == {"broken", "garbage"}
    assert "undecodable image" in skipped["broken"] and "truncated" in skipped["broken"]  # PIL names the fault
