"""Filesystem plumbing for any fsspec URL: paths, small atomic JSON records, downloads.

Everything here is about files, not about caches: the cache format lives in `store`, and the
trainer uses these helpers for its outputs and weights too.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
import time
import uuid

import fsspec

from .errors import CacheError, ConfigError


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def storage_options_for(url: str, storage_options: dict | None = None) -> dict:
    """The options a URL is opened with. S3 gets timeouts and bounded retries unless the user set them: a
    hung server must fail with a message, not stall for minutes (botocore's defaults are 60 s per attempt,
    and s3fs retries on top). MDCACHE_STORAGE_TIMEOUT (seconds, default 30) sets the read timeout."""
    so = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")) and "config_kwargs" not in so:
        import s3fs

        timeout = float(os.environ.get("MDCACHE_STORAGE_TIMEOUT", "30"))
        # s3fs retries timeouts itself (5 times by default, with backoff): one botocore attempt per s3fs try,
        # and 3 tries, so a hung server fails in about 3 x timeout per request.
        so["config_kwargs"] = {"connect_timeout": min(5.0, timeout), "read_timeout": timeout,
                               "retries": {"max_attempts": 1, "mode": "standard"}}
        s3fs.S3FileSystem.retries = min(s3fs.S3FileSystem.retries, 3)
    return so


def url_to_fs(url: str, storage_options: dict | None = None):
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
    return fs, path.rstrip("/")


def parse_storage_options(items: list[str]) -> dict:
    """['endpoint_url=http://...', 'anon=true'] -> fsspec kwargs (JSON scalars are decoded).
    Called once, at the CLI edge (`mdcache.commands`); the Python API takes the dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--storage-option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value) if value in ("true", "false", "null") or value[:1].isdigit() else value
        except ValueError:
            out[key] = value
    return out


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def user_cache_dir(*parts: str) -> str:
    """Where downloaded copies live: $MDCACHE_HOME, else ~/.cache/mdcache."""
    base = os.environ.get("MDCACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "mdcache")
    return os.path.join(base, *parts)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def download_tree(fs, remote: str, local: str, files: list[str] | None = None, merge: bool = False) -> str:
    """Copy a remote file or directory (or the given files under it) to `local`. By default the copy is
    atomic: it appears complete under its final name or not at all (a concurrent copier loses quietly).
    merge=True instead refreshes an existing local directory file by file (each file replaced atomically)."""
    if files is None and fs.isfile(remote):
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.part-{uuid.uuid4().hex[:8]}"
        fs.get_file(remote, tmp)
        os.replace(tmp, local)
        return local
    files = fs.find(remote) if files is None else files
    if merge:
        for f in files:
            dst = os.path.join(local, f[len(remote):].lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.part-{uuid.uuid4().hex[:8]}"
            fs.get_file(f, tmp)
            os.replace(tmp, dst)
        return local
    tmp = f"{local}.part-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp, exist_ok=True)
    for f in files:
        dst = os.path.join(tmp, f[len(remote):].lstrip("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.get_file(f, dst)
    try:
        os.rename(tmp, local)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def fetch(url: str, storage_options: dict | None = None) -> str:
    """A local path for a file given as a path or any fsspec URL (weights, checkpoints). Remote files are
    downloaded once and kept, keyed by URL, size and ETag, so a changed object is fetched again."""
    fs, path = url_to_fs(url, storage_options)
    if is_local(fs):
        return path
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ConfigError(f"{url}: no such file") from None
    version = f"{url}|{info.get('size')}|{info.get('ETag') or info.get('LastModified')}"
    key = hashlib.sha256(version.encode()).hexdigest()[:16]
    dst = os.path.join(user_cache_dir("fetch", key), os.path.basename(path))
    if not os.path.exists(dst):
        download_tree(fs, path, dst)
    return dst


def parse_json(raw: bytes, where: str) -> dict:
    """A small JSON record; a damaged one is a CacheError naming the file."""
    try:
        obj = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = "empty" if not raw else f"{len(raw)} bytes, {e}"
        raise CacheError(f"{where}: not valid JSON ({why}); the file is truncated or damaged") from None
    if not isinstance(obj, dict):
        raise CacheError(f"{where}: a JSON {type(obj).__name__}, not an object: damaged")
    return obj


def read_json_many(fs, paths: list[str]) -> dict[str, dict]:
    """Many small records at once: one batch of concurrent GETs on object stores (fsspec's cat of a list),
    not a round trip each. Files deleted since they were listed are left out."""
    if not paths:
        return {}
    got = fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error="return")  # no glob expansion
    out = {}
    for p, raw in zip(paths, got):
        if isinstance(raw, FileNotFoundError):
            continue
        if isinstance(raw, Exception):
            raise raw
        out[p] = parse_json(raw, fs.unstrip_protocol(p))
    return out


def read_json(fs, path: str) -> dict:
    # cat_file: one plain GET. fs.open() would pin the ETag of a possibly cached listing, and small
    # records (claims) are replaced by other processes: S3 then answers 412 PreconditionFailed.
    return parse_json(fs.cat_file(path), fs.unstrip_protocol(path))


def write_json(fs, path: str, obj: dict, exclusive: bool = False) -> bool:
    """Atomically publish a small JSON file. With exclusive, never replace an existing one and
    return False if it already existed. Local: write a temp file, then link/rename it into place.
    Object stores: one PUT (conditional If-None-Match where the store supports it)."""
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if not exclusive:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)  # atomic, fails if path exists
                return True
            except FileExistsError:
                return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if exclusive:
        return _put_if_absent(fs, path, data)
    fs.pipe_file(path, data)
    return True


def _put_if_absent(fs, path: str, data: bytes) -> bool:
    try:
        fs.pipe_file(path, data, mode="create")  # s3fs >= 2024.12: conditional put
        return True
    except FileExistsError:
        return False
    except TypeError:  # filesystem without mode=: check, put, then verify nobody raced us
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return fs.cat_file(path) == data
    except OSError as e:  # S3 answers 412 Precondition Failed when the object exists
        if any(m in str(e) for m in ("PreconditionFailed", "pre-condition", "precondition", "412")):
            return False
        raise
