"""The coordination primitives on a local disk: exclusive JSON records, commit races, shard claims."""
import json
import os
import time

from mdcache import fs as mfs
from mdcache import store
from mdcache.claims import Claims, Renewer


def test_write_json_exclusive_never_replaces(tmp_path):
    fs, path = mfs.url_to_fs(str(tmp_path))
    rec = mfs.join(path, "a", "r.json")
    assert mfs.write_json(fs, rec, {"v": 1}, exclusive=True)
    assert not mfs.write_json(fs, rec, {"v": 2}, exclusive=True)
    assert mfs.read_json(fs, rec) == {"v": 1}
    assert mfs.write_json(fs, rec, {"v": 3})  # not exclusive: replaced
    assert mfs.read_json(fs, rec) == {"v": 3}
    assert os.listdir(tmp_path / "a") == ["r.json"]  # no temp file left behind


def record(shard: str, path: str) -> dict:
    return {"shard": shard, "path": path, "samples": 1, "views": 1, "checksums": {}}


def test_lost_commit_race_leaves_the_first_record(tmp_path):
    url = str(tmp_path / "cache")
    first, second = record("s0", "shards/s0.aaaa"), record("s0", "shards/s0.bbbb")
    assert store.commit_shard(url, first) is True
    assert store.commit_shard(url, second) is False
    assert json.loads((tmp_path / "cache" / "commits" / "s0.json").read_text()) == first


def test_claims_acquire_renew_release(tmp_path):
    url = str(tmp_path / "cache")
    alice, bob = Claims(url, "alice@host-a:1:a", 60), Claims(url, "bob@host-b:2:b", 60)
    assert alice.acquire("s0") is None
    assert alice.acquire("s0") is None  # already ours
    assert bob.acquire("s0") == "alice@host-a:1:a"
    assert alice.mine() == ["s0"] and bob.mine() == []
    assert not bob.renew("s0") and alice.renew("s0")
    bob.release("s0")  # not his: the claim stays
    assert alice.mine() == ["s0"]
    alice.release("s0")
    assert not (tmp_path / "cache" / "claims" / "s0.json").exists()
    # An expired claim of another machine is taken over; a committed shard is not claimed at all.
    (tmp_path / "cache" / "claims" / "s1.json").write_text(json.dumps(
        {"shard": "s1", "owner": "carol@host-c:3:c", "expires": time.time() - 1}))
    assert bob.acquire("s1") is None and bob.mine() == ["s1"]
    assert store.commit_shard(url, record("s2", "shards/s2.cccc"))
    assert alice.acquire("s2") == "committed"


def test_renewer_survives_store_errors(tmp_path, capsys):
    url = str(tmp_path / "cache")
    claims = Claims(url, "alice@host-a:1:a", ttl=0.3)
    assert claims.acquire("s0") is None
    claim = tmp_path / "cache" / "claims" / "s0.json"
    broken = tmp_path / "cache" / "claims" / "broken.json"
    broken.mkdir()  # listing the claims now fails with a real OSError (IsADirectoryError)
    renewer = Renewer(claims)
    renewer.start()
    try:
        deadline = time.time() + 30
        while renewer.errors < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert renewer.errors >= 3 and renewer.is_alive()
        broken.rmdir()
        fixed_at = time.time()
        while json.loads(claim.read_text())["expires"] < fixed_at + 0.3 and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads(claim.read_text())["expires"] >= fixed_at + 0.3, "the claim was not renewed after the error"
    finally:
        renewer.stop()
        renewer.join()
    assert capsys.readouterr().err.count("renewing claims") == 1  # reported once, not every tick
