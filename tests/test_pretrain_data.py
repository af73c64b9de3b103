"""The lockstep stream on a real cache: split, views, resume positions, lockstep checks, errors."""
import io
import os
import shutil
import tarfile
from dataclasses import replace

import pytest
import torch
from helpers import make_cache, shared_cache

from mdcache import open_cache, store, views
from mdcache.extract import ExtractConfig
from mdcache.sources import SourceError, list_source
from mdtrain import data


@pytest.fixture(scope="module")
def cache(tmp_path_factory, train_spec):
    return open_cache(shared_cache(tmp_path_factory, train_spec))


def scfg(**kw):
    base = dict(batch_size=4, image_size=64, grid=(4, 4), views=2, seed=3, shuffle_buffer=8, lanes=2)
    base.update(kw)
    return data.StreamConfig(**base)


def keys_of(batches):
    return [b["keys"] for b in batches]


def test_ranks_and_lanes_see_disjoint_data_and_all_views(cache):
    plan = data.plan_from_cache(cache)
    assert [p.samples for p in plan] == [30, 30, 30, 30]
    views_used = {}
    for epoch in range(2):
        seen = []
        for rank in range(2):
            cfg = scfg(rank=rank, world=2)
            batches = list(data.ShardStream(plan, cfg, epoch, cache=cache))
            assert len(batches) == sum(data.lane_batch_counts(plan, cfg, epoch)) == 14  # 2 lanes x 30 // 4
            ks = [k for b in batches for k in b["keys"]]
            assert len(ks) == len(set(ks)) == 56
            seen.append(set(ks))
            for b in batches:
                assert b["images"].dtype == torch.uint8 and b["images"].shape == (4, 3, 64, 64)
                assert b["mask"].shape == (4, 16) and (b["mask"].sum(1) == 6).all()
                assert b["targets"]["targets"].dtype == torch.float16  # still encoded: decoded on the device
                for s, v in zip(b["shards"], b["views"]):
                    views_used.setdefault(s, set()).add((epoch, v))
        assert not seen[0] & seen[1]  # ranks: disjoint
    # Every shard uses one view per epoch, and the K=2 epochs use both views.
    assert all(len(v) == 2 and {x[1] for x in v} == {0, 1} for v in views_used.values()), views_used
    assert data.steps_per_epoch(plan, scfg(rank=0, world=2), epochs=3) == 14


@pytest.mark.parametrize("replay", views.REPLAYS)
def test_targets_and_pixels_are_the_stored_views_replayed_as_the_cache_was(tmp_path_factory, demo_data, replay):
    """The trainer replays with the implementation the cache was extracted with (recorded in its
    fingerprint), whatever the default of this mdcache is."""
    from mdcache.sources import iter_samples
    from mdtrain.pretrain import PretrainConfig, make_stream, setup_data

    source = str(demo_data / "train-000000.tar")
    url = make_cache(tmp_path_factory.getbasetemp() / f"replay-{replay}", source, replay=replay, color_jitter=0.4)
    cache = open_cache(url)
    assert cache.replay == replay == cache.manifest["fingerprint"]["views"]["replay"]
    setup = setup_data(PretrainConfig(cache=url, batch_size=4, workers=0, seed=3), torch.device("cpu"))
    assert setup.stream.replay == replay
    batch = next(iter(make_stream(setup, 0)))
    shard = batch["shards"][0]
    keys, targets, params = cache.read(shard, batch["views"][0])
    images = {s.key: s.data for s in iter_samples(list_source(source)[0])}
    decoded = cache.decode(batch["targets"])
    other = next(r for r in views.REPLAYS if r != replay)
    for j, key in enumerate(batch["keys"]):
        i = keys.index(key)
        assert torch.equal(decoded[j], torch.from_numpy(targets[i]))
        image = views.decode_image(images[key])
        assert torch.equal(batch["images"][j], views.view_pixels(image, params[i], 64, replay))
        assert not torch.equal(batch["images"][j], views.view_pixels(image, params[i], 64, other))
        student = data.normalize(batch["images"][j:j + 1], data.STUDENT_MEAN, data.STUDENT_STD)[0]
        assert torch.equal(student, views.to_tensor(views.replay(image, params[i], 64, replay), data.STUDENT_MEAN,
                                                    data.STUDENT_STD))


def test_the_cli_default_replay_is_the_library_default():
    from mdcache.commands import ViewOptions

    assert ViewOptions().replay == views.REPLAY_IMPL


def test_order_is_seeded_and_independent_of_loader_workers(cache):
    plan = data.plan_from_cache(cache)
    inproc = keys_of(data.ShardStream(plan, scfg(), 1, cache=cache))
    loader = keys_of(data.make_loader(data.ShardStream(plan, scfg(), 1, cache=cache), workers=2))
    assert inproc == loader
    assert keys_of(data.ShardStream(plan, scfg(seed=4), 1, cache=cache)) != inproc
    assert keys_of(data.ShardStream(plan, scfg(), 0, cache=cache)) != inproc  # reshuffled every epoch


@pytest.mark.parametrize("skip", [1, 5, 8, 13])
def test_mid_epoch_skip_continues_the_exact_sequence(cache, skip):
    plan = data.plan_from_cache(cache)
    cfg = scfg(batch_size=3)  # 2 lanes with 20 and 20... batches: exhausted lanes are exercised too
    full = keys_of(data.ShardStream(plan, cfg, 0, cache=cache))
    resumed = keys_of(data.make_loader(data.ShardStream(plan, cfg, 0, skip, cache=cache), workers=2))
    assert resumed == full[skip:]


def test_online_stream_replays_the_cached_views(cache, train_spec):
    """Online without a cache samples views with the extractor's sampler: same pixels, masks, order."""
    plan_c = data.plan_from_cache(cache)
    plan_s = data.plan_from_source(train_spec)
    assert [(p.name, p.samples) for p in plan_s] == [(p.name, p.samples) for p in plan_c]
    recipe = ExtractConfig(views=2, seed=0).view_recipe(64, 0)  # the extractor's defaults (jitter 0.4)
    a = list(data.ShardStream(plan_c, scfg(lanes=1, with_targets=False), 1, cache=cache))
    b = list(data.ShardStream(plan_s, scfg(lanes=1), 1, recipe=recipe))
    assert keys_of(a) == keys_of(b) and "targets" not in a[0] and "targets" not in b[0]
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["mask"], y["mask"])


def test_int8_targets_travel_encoded(tmp_path_factory, train_spec):
    cache = open_cache(shared_cache(tmp_path_factory, train_spec, codec="int8"))
    plan = data.plan_from_cache(cache)
    batch = next(iter(data.ShardStream(plan, scfg(lanes=1), 0, cache=cache)))
    assert batch["targets"]["targets"].dtype == torch.int8 and batch["targets"]["scales"].dtype == torch.float32
    keys, targets, _ = cache.read(batch["shards"][0], batch["views"][0])
    i = keys.index(batch["keys"][0])
    assert torch.allclose(cache.decode(batch["targets"])[0], torch.from_numpy(targets[i]))


def rewrite_tar(src, dst, rename=None, drop=None):
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            key = m.name.split(".")[0]
            if key == drop:
                continue
            data_ = tin.extractfile(m).read()
            info = tarfile.TarInfo(m.name.replace(rename[0], rename[1]) if rename and key == rename[0] else m.name)
            info.size = len(data_)
            tout.addfile(info, io.BytesIO(data_))


def test_keys_mismatch_names_the_shard(cache, demo_data, tmp_path):
    plan = data.plan_from_cache(cache)
    for name in ("train-000000", "train-000001", "train-000002", "train-000003"):
        shutil.copy(demo_data / f"{name}.tar", tmp_path / f"{name}.tar")
    victim = plan[2].name
    first_key = next(iter(tarfile.open(demo_data / f"{victim}.tar").getnames())).split(".")[0]
    rewrite_tar(demo_data / f"{victim}.tar", tmp_path / f"{victim}.tar", rename=(first_key, "intruder-000"))
    plan = data.plan_from_cache(cache, str(tmp_path / "train-{000000..000003}.tar"))
    with pytest.raises(data.DataError, match=rf"shard '{victim}'.*'intruder-000' but the cache has '{first_key}'"):
        list(data.ShardStream(plan, scfg(lanes=1), 0, cache=cache))
    rewrite_tar(demo_data / f"{victim}.tar", tmp_path / f"{victim}.tar", drop=first_key)
    # a shard rewritten after the plan was made: its size is not the one listed, caught before any sample
    with pytest.raises(SourceError, match=rf"{victim}.tar' \({victim}\) is \d+ bytes now but was \d+"):
        list(data.ShardStream(plan, scfg(lanes=1), 0, cache=cache))
    with pytest.raises(data.DataError, match=rf"differ in size from the ones the cache was made from: {victim}"):
        data.plan_from_cache(cache, str(tmp_path / "train-{000000..000003}.tar"))
    with pytest.raises(data.DataError, match="lacks shard"):
        data.plan_from_cache(cache, str(tmp_path / "train-00000[01].tar"))


def test_corrupt_cache_shard_is_named(cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache.url, copy)
    c = open_cache(str(copy))
    victim = c.shard_names[1]
    chunk_dir = copy / c.commits[victim]["path"] / "targets" / "c"
    for root, _, files in os.walk(chunk_dir):
        for f in files:  # corrupt every view's chunk of that shard
            p = os.path.join(root, f)
            b = bytearray(open(p, "rb").read())
            b[len(b) // 2] ^= 0xFF
            open(p, "wb").write(bytes(b))
    plan = data.plan_from_cache(c)
    with pytest.raises(store.CacheError, match=victim):
        list(data.make_loader(data.ShardStream(plan, scfg(), 0, cache=c), workers=2))


def test_incomplete_cache_is_refused(tmp_path, train_spec):
    url = make_cache(tmp_path, train_spec, shards="0:2")
    with pytest.raises(data.DataError, match=r"incomplete: 2/4 shards committed; missing train-000002, train-000003"):
        data.plan_from_cache(open_cache(url))


def test_fresh_crops_are_new_every_epoch_and_a_pure_function_of_seed_epoch_key(train_spec):
    """--fresh-crops: the paper's recipe. A new crop (and jitter) per image and epoch; the same on a rerun,
    on another worker count and after a mid-epoch skip, so a resumed run sees exactly the same pixels."""
    plan = data.plan_from_source(train_spec)
    recipe = ExtractConfig(views=2, seed=0).view_recipe(64, 0)
    cfg = scfg(fresh_crops=True, with_targets=False)

    def pixels(epoch, skip=0, workers=0):
        stream = data.ShardStream(plan, cfg, epoch, skip, recipe=recipe)
        batches = data.make_loader(stream, workers) if workers else stream
        return {k: img for b in batches for k, img in zip(b["keys"], b["images"])}

    e0, e1 = pixels(0), pixels(1)
    assert set(e0) == set(e1) and len(e0) >= 100
    same = sum(torch.equal(e0[k], e1[k]) for k in e0)
    assert same == 0, f"{same} images got the same crop in two epochs"
    again, workers = pixels(1), pixels(1, workers=2)
    assert all(torch.equal(e1[k], again[k]) and torch.equal(e1[k], workers[k]) for k in e1)
    full = keys_of(data.ShardStream(plan, cfg, 1, recipe=recipe))
    tail = pixels(1, skip=5)
    assert list(tail) == [k for ks in full[5:] for k in ks]
    assert all(torch.equal(tail[k], e1[k]) for k in tail)
    # Replayed K views (no --fresh-crops) repeat: epochs 0 and 2 of K=2 use the same set of crops.
    replay = [data.ShardStream(plan, scfg(with_targets=False), e, recipe=recipe) for e in (0, 1, 2, 3)]
    crops = [{k: img for b in s for k, img in zip(b["keys"], b["images"])} for s in replay]
    assert all(any(torch.equal(crops[e][k], crops[f][k]) for f in (0, 1)) for e in (2, 3) for k in crops[e])


@pytest.mark.parametrize("where", ["device", "device-decode"])
def test_views_replayed_on_the_device_equal_the_workers(cache, where):
    """--replay-on device: workers ship decoded images, the step's device replays the views with the cache's
    implementation; device-decode: workers ship the image files and the device decodes them too. On the CPU
    both are the same kernels (torchvision's JPEG decoder is libjpeg-turbo, as PIL's): the same pixels, bit for
    bit (on a GPU within 2 levels, tests/test_views_sources.py), with the same targets and masks."""
    plan = data.plan_from_cache(cache)
    cfg = scfg(lanes=1, replay=cache.replay)
    here = next(iter(data.ShardStream(plan, cfg, 0, cache=cache)))
    there = next(iter(data.ShardStream(plan, replace(cfg, replay_on=where), 0, cache=cache)))
    shipped = there["images"][0]
    assert isinstance(there["images"], list) and shipped.shape[1:] != (64, 64)  # decoded or encoded, not replayed
    assert shipped.ndim == (1 if where == "device-decode" else 3)
    assert where == "device" or views.jpeg_components(shipped) == 3  # a colour JPEG: torchvision decodes it
    on = data.to_device(there, torch.device("cpu"), replace(cfg, replay_on=where))
    assert torch.equal(on["images"], here["images"]) and torch.equal(on["mask"], here["mask"])
    assert all(torch.equal(on["targets"][n], here["targets"][n]) for n in here["targets"]) and "params" not in on


def test_an_image_the_device_cannot_decode_is_named(cache):
    """device-decode finds a bad file only on the device: the error names its shard and key, as the workers'."""
    plan = data.plan_from_cache(cache)
    cfg = replace(scfg(lanes=1, replay=cache.replay), replay_on="device-decode")
    batch = next(iter(data.ShardStream(plan, cfg, 0, cache=cache)))
    batch["images"][1] = batch["images"][1][: len(batch["images"][1]) // 2]  # truncated on the way
    with pytest.raises(data.DataError, match=f"shard {batch['shards'][1]!r}, sample {batch['keys'][1]!r}: "):
        data.to_device(batch, torch.device("cpu"), cfg)




def test_training_says_when_it_decodes_otherwise_than_the_extraction(capsys):
    """A cache a GPU decoded (nvJPEG) trained with CPU decoding, or the reverse: pixels differ by a few levels
    from what the teacher saw, and the run says so (once, on rank 0) with the --replay-on that matches."""
    from types import SimpleNamespace

    from mdtrain.pretrain import check_decoder

    nv = SimpleNamespace(manifest={"fingerprint": {"views": {"decoder": "nvjpeg"}}})
    cpu = SimpleNamespace(manifest={"fingerprint": {"views": {}}})
    check_decoder(cpu, "device-decode", torch.device("cpu"))  # a CPU decodes as PIL did: nothing to say
    check_decoder(nv, "workers", torch.device("cpu"))
    said = " ".join(capsys.readouterr().err.split())
    assert said.count("note:") == 1 and "decoded with nvjpeg, this run decodes with libjpeg-turbo" in said
    assert "--replay-on device-decode decodes as it did" in said
