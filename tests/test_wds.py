"""The cache as a WebDataset stage (`mdcache.wds.with_targets`) and the plain PyTorch + timm example built on
it: same targets as `Cache.read`, same pixels and loss as `mdtrain pretrain`, a named error for a stray key."""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import ROOT, shared_cache

from mdcache import open_cache, views
from mdcache.errors import CacheError
from mdcache.wds import with_targets
from mdtrain import data, objective

EXAMPLE = ROOT / "docs" / "examples" / "wds_maskdistill.py"


@pytest.fixture(scope="module")
def cache(tmp_path_factory, train_spec):
    return open_cache(shared_cache(tmp_path_factory, train_spec))


def stage_samples(cache, urls, epoch):
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).compose(with_targets(cache, epoch=epoch)))


def test_stage_attaches_the_epochs_view_like_cache_read_and_mdtrain(cache, demo_data):
    urls = str(demo_data / "train-{000000..000001}.tar")
    samples = stage_samples(cache, urls, epoch=1)
    assert len(samples) == 60
    for shard in ("train-000000", "train-000001"):
        view = views.view_for(0, shard, 1, cache.views)
        keys, targets, params = cache.read(shard, view)
        mine = [s for s in samples if s["__url__"].endswith(f"{shard}.tar")]
        assert [s["__key__"] for s in mine] == keys and {s["mdcache.view"] for s in mine} == {view}
        assert np.array_equal(np.stack([s["mdcache.params"] for s in mine]), params)
        assert torch.equal(torch.stack([s["mdcache.targets"] for s in mine]), torch.from_numpy(targets))
    # mdtrain's stream with the same seed and epoch replays the same view on the same pixels
    cfg = data.StreamConfig(batch_size=4, image_size=cache.image_size, grid=cache.patch_grid, views=cache.views,
                            seed=0, shuffle_buffer=8, lanes=1)
    by_key = {s["__key__"]: s for s in samples}
    batch = next(iter(data.ShardStream(data.plan_from_cache(cache)[:1], cfg, 1, cache=cache)))
    for i, key in enumerate(batch["keys"]):
        ours = torch.from_numpy(np.asarray(by_key[key]["mdcache.image"]).copy()).permute(2, 0, 1)
        assert torch.equal(ours, batch["images"][i])
        assert torch.equal(by_key[key]["mdcache.targets"], cache.decode(batch["targets"])[i])
    fixed = stage_samples(cache, str(demo_data / "train-000000.tar"), epoch=5)
    assert {s["mdcache.view"] for s in fixed} == {views.view_for(0, "train-000000", 5, cache.views)}


def test_a_sample_without_a_target_names_its_shard_and_key(cache, demo_data, tmp_path):
    raw = (demo_data / "train-000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        first = next(m for m in tf if m.name.endswith(".jpg"))
        jpg = tf.extractfile(first).read()
    buf = io.BytesIO(raw[:-1024 * 2])  # drop the end-of-archive blocks, then append one more sample
    with tarfile.open(fileobj=buf, mode="a") as tf:
        info = tarfile.TarInfo("intruder.jpg")
        info.size = len(jpg)
        tf.addfile(info, io.BytesIO(jpg))
    (tmp_path / "train-000000.tar").write_bytes(buf.getvalue())
    with pytest.raises(CacheError, match="shard 'train-000000' has no target for key 'intruder'"):
        stage_samples(cache, str(tmp_path / "train-000000.tar"), epoch=0)
    (tmp_path / "train-000009.tar").write_bytes(raw)
    with pytest.raises(CacheError, match="shard 'train-000009' is not committed"):
        stage_samples(cache, str(tmp_path / "train-000009.tar"), epoch=0)


@pytest.mark.slow
def test_the_docs_example_matches_mdtrains_objective_and_trains(cache, demo_data):
    spec = importlib.util.spec_from_file_location("wds_maskdistill", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    pred, targets = torch.randn(3, 16, cache.teacher_dim), torch.randn(3, 16, cache.teacher_dim) * 5 + 2
    mask = torch.rand(3, 16) < 0.4
    assert torch.allclose(example.masked_loss(pred, targets, mask), objective.masked_feature_loss(pred, targets, mask))
    p = subprocess.run([sys.executable, str(EXAMPLE), cache.url, str(demo_data / "train-{000000..000003}.tar"),
                        "--batch-size", "8", "--epochs", "2"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [float(line.rsplit(" ", 1)[1]) for line in p.stdout.splitlines() if line.startswith("epoch")]
    assert len(losses) == 2 * 2 * -(-60 // 8) and all(np.isfinite(losses))  # 2 epochs x 2 workers x 60 samples
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it learns
