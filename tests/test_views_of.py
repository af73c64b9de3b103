"""A second teacher on the first one's views: `mdcache extract --views-of A` replays the view parameters cache A
stored (crop, flip, jitter, key by key and view by view) at the new teacher's own input size, so the two caches
line up for multi-teacher training; the fingerprint names A, `ls` groups them, and both grow together."""
import numpy as np
import pytest
from helpers import extract_cfg, run_cli

from mdcache import open_cache
from mdcache.errors import ConfigError
from mdcache.extract import extract


def two_shards(train_spec: str) -> str:
    return train_spec.replace("000003", "000001")


def second_teacher(spec: str, root: str, views_of: str, **kw):
    """Another teacher: other weights (seed 1), another input size (32 px: a 2x2 grid, A's is 4x4), another codec."""
    return extract_cfg(spec, root, views_of=views_of, teacher_seed=1, image_size=32, codec="int8", **kw)


@pytest.fixture(scope="module")
def pair(train_spec, tmp_path_factory):
    root, spec = tmp_path_factory.mktemp("views-of"), two_shards(train_spec)
    a, _ = extract(extract_cfg(spec, str(root)), progress=False)
    b, summary = extract(second_teacher(spec, str(root), a), progress=False)
    return {"a": a, "b": b, "root": root, "spec": spec, "summary": summary}


def same_views(a, b, views: int) -> None:
    assert sorted(a.commits) == sorted(b.commits)
    for shard in a.commits:
        for v in range(views):
            ka, _, pa = a.read_encoded(shard, v, targets=False)
            kb, _, pb = b.read_encoded(shard, v, targets=False)
            assert ka == kb and np.array_equal(pa, pb), (shard, v)


def test_the_second_teacher_sees_exactly_the_stored_views(pair):
    a, b = open_cache(pair["a"]), open_cache(pair["b"])
    assert a.cache_id != b.cache_id and b.manifest["fingerprint"]["views"]["views_of"] == a.cache_id
    assert b.manifest["teacher"]["patch_grid"] == [2, 2] != a.manifest["teacher"]["patch_grid"]
    assert pair["summary"]["committed"] == ["train-000000", "train-000001"]
    same_views(a, b, 2)
    # its targets are its own teacher's features of those views, replayed at its input size
    check = run_cli("verify", pair["b"], "--teacher-check", "8")
    assert check.stdout.strip() == "OK" and "teacher check on 8 replayed views" in check.stderr


def test_the_source_defaults_to_the_views_of_caches(pair, tmp_path):
    """`mdcache extract --teacher T2 --views-of A`, as a user types it: A's images, without --source again."""
    again = run_cli("extract", "--views-of", pair["a"], "--teacher", "open_clip:tests/assets/tiny-clip.json",
                    "--random-init", "--teacher-seed", "1", "--image-size", "32", "--codec", "int8",
                    "--root", str(pair["root"]), "--workers", "0", "--batch-size", "8", "--calib-images", "16")
    assert again.stdout.strip().splitlines()[-1] == pair["b"] and "reusing 2 committed shard(s)" in again.stderr
    missing = run_cli("extract", "--teacher", "clip-b16", "--root", str(tmp_path), check=False)
    assert missing.returncode == 2 and "--source is required" in missing.stderr


def test_ls_and_info_say_which_caches_share_views(pair):
    a, b = open_cache(pair["a"]), open_cache(pair["b"])
    ls = run_cli("ls", str(pair["root"])).stdout
    assert f"same views: {a.cache_id}, {b.cache_id}" in ls
    assert f"the views of cache {a.cache_id}" in run_cli("info", pair["b"]).stdout
    assert "the views of cache" not in run_cli("info", pair["a"]).stdout


def test_views_of_is_refused_when_the_caches_cannot_line_up(pair, train_spec, tmp_path):
    with pytest.raises(ConfigError, match="stores 2 views per image; grow it first"):
        extract(second_teacher(pair["spec"], str(tmp_path), pair["a"], views=3), progress=False)
    with pytest.raises(ConfigError, match="made from another source"):
        extract(second_teacher(train_spec, str(tmp_path), pair["a"]), progress=False)
    part, _ = extract(extract_cfg(train_spec, str(tmp_path / "part"), shards="0:1"), progress=False)
    with pytest.raises(ConfigError, match="incomplete"):
        extract(second_teacher(train_spec, str(tmp_path), part), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["part"]  # a refused run creates no cache


def test_both_caches_grow_and_stay_aligned(pair, tmp_path):
    """A grown to 4 views, then B asked for 4: B computes views 2-3 only, on A's views 2-3; a third teacher
    on B's views records A (the cache that drew them), so every cache of the group says the same."""
    spec, root = pair["spec"], str(pair["root"])
    extract(extract_cfg(spec, root, views=4), progress=False)
    b, summary = extract(second_teacher(spec, root, pair["a"], views=4, workers=2), progress=False)  # in workers
    assert b == pair["b"] and summary["grow"] == {"train-000000": 2, "train-000001": 2}
    same_views(open_cache(pair["a"]), open_cache(b), 4)
    c, _ = extract(extract_cfg(spec, root, views_of=b, views=4, teacher_seed=2), progress=False)
    assert open_cache(c).manifest["fingerprint"]["views"]["views_of"] == open_cache(pair["a"]).cache_id
    same_views(open_cache(pair["a"]), open_cache(c), 4)
    assert open_cache(c).views == 4
