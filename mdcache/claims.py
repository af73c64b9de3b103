"""Shard claims: several extractors on one cache compute each shard once.

A claim is `<cache>/claims/<shard>.json` = {owner, expires}. It is created with the same
create-if-absent put as commits, renewed by its owner while it works, released after the commit,
and taken over by anyone once it has expired (its owner died). Claims only avoid duplicate work:
correctness never depends on them, because commits themselves are create-if-absent.
Expiry compares wall clocks of different machines: keep the TTL well above any clock skew.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Iterator

from rich.console import Console

from . import fs as mfs
from . import store
from .errors import CacheError


def new_owner() -> str:
    return f"{mfs.who()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """A claim made on this very host by a process that no longer exists (e.g. killed with -9) is
    stale now, not after its TTL: a re-run on the same machine resumes at once."""
    try:
        host_user, pid, _ = owner.rsplit(":", 2)
        if host_user.split("@", 1)[1] != socket.gethostname():
            return False
        os.kill(int(pid), 0)
        try:  # a zombie (killed, not yet reaped by its parent) is dead too
            with open(f"/proc/{int(pid)}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return False
    except ProcessLookupError:
        return True
    except (ValueError, IndexError, PermissionError):
        return False


class Claims:
    """Claim, renew and release shards of one cache for one owner (picklable into loader workers).

    Renewing is a read then a write: a release between the two would be undone by the write, leaving a
    claim of ours after the commit. So renew and release of one process hold one lock, and a released
    shard is never renewed again by this process."""

    def __init__(self, cache_url: str, owner: str, ttl: float, storage_options: dict | None = None):
        self.cache_url, self.owner, self.ttl, self.storage_options = cache_url, owner, ttl, storage_options
        self._lock, self._released = threading.Lock(), set()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_released")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._released = threading.Lock(), set()

    def _paths(self, shard: str, stem: str | None = None) -> tuple:
        """The claim's file, and the commit record whose existence means the work is done (`stem`: the
        record of the K being made, <shard>@<K>; a cache grows by new records)."""
        fs, path = mfs.url_to_fs(self.cache_url, self.storage_options)
        return fs, store.claim_file(path, shard), store.record_file(path, stem or shard)

    def _record(self, shard: str) -> dict:
        return {"shard": shard, "owner": self.owner, "expires": time.time() + self.ttl, "ttl": self.ttl,
                "renewed_at": mfs.now()}

    def acquire(self, shard: str, stem: str | None = None) -> str | None:
        """Claim `shard` (to make commit record `stem`). Returns None on success, else why not: 'committed' or
        the live owner."""
        fs, claim, commit = self._paths(shard, stem)
        fs.invalidate_cache(commit.rsplit("/", 1)[0])
        if fs.exists(commit):
            return "committed"
        for _ in range(3):
            if mfs.write_json(fs, claim, self._record(shard), exclusive=True):
                with self._lock:
                    self._released.discard(shard)
                return None
            try:
                cur = mfs.read_json(fs, claim)
            except FileNotFoundError:  # released between our put and our read: try again
                continue
            if cur.get("owner") == self.owner:
                with self._lock:
                    self._released.discard(shard)
                return None
            if cur.get("expires", 0) > time.time() and not owner_is_dead(cur.get("owner", "")):
                return cur.get("owner", "?")
            fs.rm(claim)  # expired: its owner died or stalled; take it over
        return "contended"

    def renew(self, shard: str) -> bool:
        fs, claim, _ = self._paths(shard)
        with self._lock:
            if shard in self._released:
                return False
            try:
                if mfs.read_json(fs, claim).get("owner") != self.owner:
                    return False
            except FileNotFoundError:
                return False
            mfs.write_json(fs, claim, self._record(shard))
            return True

    def release(self, shard: str) -> None:
        fs, claim, _ = self._paths(shard)
        with self._lock:
            self._released.add(shard)
            try:
                if mfs.read_json(fs, claim).get("owner") == self.owner:
                    fs.rm(claim)
            except FileNotFoundError:
                pass

    def mine(self) -> list[str]:
        """Shards this owner currently holds claims on (claims made in loader workers included)."""
        fs, path = mfs.url_to_fs(self.cache_url, self.storage_options)
        return [rec["shard"] for _, rec in records(fs, mfs.join(path, store.CLAIMS)) if rec.get("owner") == self.owner]


def records(fs, cdir: str, damaged: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(path, record) of every claim in `cdir`, read now. A claim released while listed is passed over; a
    damaged one raises, or goes into `damaged` when given (gc removes it: no owner can be renewing it)."""
    fs.invalidate_cache(cdir)
    for p in fs.ls(cdir, detail=False) if fs.exists(cdir) else []:
        if not p.endswith(".json"):  # write probes, an object store's directory marker
            continue
        try:
            rec = mfs.read_json(fs, p)
        except FileNotFoundError:
            continue
        except CacheError:
            if damaged is None:
                raise
            damaged.append(p)
            continue
        yield p, rec


class Renewer(threading.Thread):
    """Renews every claim of this owner each ttl/3 seconds until stopped. A store error (listing or
    renewing) is reported once and retried next tick: a thread that died here would let every claim
    expire while the work goes on, and another extractor would redo it."""

    def __init__(self, claims: Claims):
        super().__init__(daemon=True, name="mdcache-claim-renewer")
        self.claims, self.stopped, self.errors = claims, threading.Event(), 0

    def run(self) -> None:
        while not self.stopped.wait(self.claims.ttl / 3):
            try:
                shards = self.claims.mine()
            except OSError as e:  # transient store error: the next round retries well before expiry
                self.failed(e)
                continue
            for shard in shards:
                try:
                    self.claims.renew(shard)
                except OSError as e:
                    self.failed(e)

    def failed(self, e: OSError) -> None:
        if not self.errors:
            Console(stderr=True).print(f"[yellow]warning:[/] renewing claims on {self.claims.cache_url} failed "
                                       f"({type(e).__name__}: {e}); retrying every {self.claims.ttl / 3:.1f}s")
        self.errors += 1

    def stop(self) -> None:
        self.stopped.set()
