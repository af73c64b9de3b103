"""A machine's read-through copies of a remote cache's shards (`--local-cache DIR`).

    DIR/<cache-id>/shards/<shard>.<attempt>/   a committed attempt, downloaded whole (atomic rename)
    DIR/<cache-id>/locks/<shard>.<attempt>.lock a reader holds a shared flock while it reads the copy

Committed attempts never change, so a copy is keyed by its attempt name and never revalidated
(checksums still apply on every read). The size bound is kept by evicting least recently used
copies, but never one that a reader holds: an evictor takes the copy's lock exclusively without
waiting, and passes over a copy in use. Training cycles through its shards, so the copy about to
be reused is the least recently used one: without the lock it was deleted under the next reader.
While every copy is in use the directory may exceed its bound. Locks are `flock`s: DIR must be a
local filesystem (not NFS). Lock files are a few bytes each and are kept.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
import uuid
from typing import Iterator

from .errors import UserError
from .fs import download_tree

# errors that are the local disk's, not the bucket's
LOCAL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT,
                errno.EFBIG, errno.EEXIST}


class LocalCopyError(UserError):
    """This machine's --local-cache cannot hold a copy (a file, read-only, full). Never the bucket's fault."""


def check_dir(root: str) -> None:
    """Fail at once, naming --local-cache, when the directory cannot hold copies."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-probe-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
    except OSError as e:
        raise LocalCopyError(f"--local-cache {root}: cannot hold local copies of shards ({e.strerror or e}); "
                             "give a writable local directory (the cache in the bucket is not affected)") from None


def is_local_error(e: BaseException, root: str) -> bool:
    """An OSError about a path under this machine's copy directory (full disk, read-only, not a folder)."""
    name = str(getattr(e, "filename", "") or "")
    return isinstance(e, OSError) and e.errno in LOCAL_ERRNOS and (not name or name.startswith(root))


def _lock_path(copy: str) -> str:
    shards_dir, attempt = os.path.split(copy.rstrip("/"))
    return os.path.join(os.path.dirname(shards_dir), "locks", f"{attempt}.lock")


@contextlib.contextmanager
def _flock(copy: str, mode: int, path: str | None = None) -> Iterator[bool]:
    """The copy's lock (or the lock file `path`) in `mode` (LOCK_SH, LOCK_EX, | LOCK_NB): yields whether it
    was taken."""
    path = path or _lock_path(copy)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def reading(copy: str) -> Iterator[None]:
    """Hold `copy` against eviction while it is downloaded or read (other readers share it)."""
    with _flock(copy, fcntl.LOCK_SH):
        yield


def ensure(fs, remote: str, copy: str, tries: int = 3) -> str:
    """The local copy of a committed attempt, downloaded first if absent (call inside `reading`). A failed
    download is retried; an error of the local disk is a LocalCopyError, anything else is the remote's."""
    if os.path.isdir(copy):
        os.utime(copy)  # recency for LRU eviction
        return copy
    root = os.path.dirname(os.path.dirname(os.path.dirname(copy)))
    for attempt in range(tries):
        try:
            return download_tree(fs, remote, copy)
        except FileNotFoundError:
            raise  # the remote attempt is gone: the caller reads the bucket and says so
        except OSError as e:
            if is_local_error(e, root):
                raise LocalCopyError(f"--local-cache {root}: cannot write the local copy {copy} "
                                     f"({e.strerror or e}); the shard in the bucket is not at fault") from None
            if attempt + 1 == tries:
                raise
            time.sleep(0.5 * 2**attempt)
    return copy


def drop(copy: str) -> None:
    """Remove a copy that failed its checks: renamed aside first, so no reader opens half of it."""
    aside = f"{copy}.part-bad-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(copy, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _dir_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:  # removed meanwhile
                pass
    return total


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:  # evicted by another process meanwhile
        return 0.0


def copies(root: str) -> list[str]:
    """Every complete shard copy under a --local-cache directory (all caches)."""
    out = []
    for c in (os.listdir(root) if os.path.isdir(root) else []):
        shards = os.path.join(root, c, "shards")
        if os.path.isdir(shards):
            out += [os.path.join(shards, a) for a in os.listdir(shards) if ".part-" not in a]
    return out


def evict_lru(root: str, max_bytes: int, keep: str | None = None) -> list[str]:
    """Keep `root` under max_bytes by removing least recently used copies that no reader holds;
    returns the removed copies. One evictor at a time per root: two that measured the same total at once
    would each remove the copy the other keeps, and empty the cache between them."""
    with _flock(root, fcntl.LOCK_EX, path=os.path.join(root, "evict.lock")):
        found = copies(root)
        sizes = {s: _dir_bytes(s) for s in found}
        total, removed = sum(sizes.values()), []
        for s in sorted(found, key=_mtime):
            if total <= max_bytes:
                break
            if s == keep:
                continue
            with _flock(s, fcntl.LOCK_EX | fcntl.LOCK_NB) as mine:
                if not mine:  # a reader has it open: never deleted under it
                    continue
                drop(s)
            total -= sizes[s]
            removed.append(s)
    return removed
