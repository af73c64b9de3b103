"""Image sources: WebDataset tar shards (any fsspec URL) or an image folder cut into virtual shards.

Tars are read as a stream with the standard library (members grouped by key, WebDataset's
convention), so nothing in a source is ever unpickled and every error can name its shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from braceexpand import braceexpand

from .errors import SourceError, storage_error  # noqa: F401 (part of this module's API)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class SourceShard:
    name: str                       # stable name: tar basename without .tar, or folder-NNNNNN
    url: str                        # the tar, or the folder root
    size: int                       # bytes (identity)
    files: tuple[str, ...] = ()     # folder shards: paths relative to url
    classes: tuple[str, ...] = ()   # folder sources: sorted class names (index = label)

    def to_json(self) -> dict:
        d = {"name": self.name, "url": self.url, "size": self.size}
        if self.files:
            d["files"] = list(self.files)
        return d

    @classmethod
    def from_json(cls, d: dict, classes: tuple[str, ...] = ()) -> "SourceShard":
        """Inverse of to_json (a manifest's source entry); classes come from the manifest's source."""
        return cls(name=d["name"], url=d["url"], size=d["size"], files=tuple(d.get("files", ())),
                   classes=tuple(classes))


@dataclass
class Sample:
    key: str
    data: bytes | None              # encoded image, None if the sample had no image member
    label: int | None = None
    meta: dict = field(default_factory=dict)


def open_fs(url: str, storage_options: dict | None):
    """(filesystem, path) of a source URL, with the timeouts and bounded retries every bucket read gets."""
    from . import fs as mfs

    return mfs.url_to_fs(url, storage_options)


def _unstrip(fs, url: str, path: str) -> str:
    """fsspec strips the protocol; put it back so URLs stay usable on their own."""
    proto = url.split("://", 1)[0] if "://" in url else None
    return f"{proto}://{path}" if proto and proto != "file" else path


def list_source(spec: str, storage_options: dict | None = None, folder_shard_size: int = 1000) -> list[SourceShard]:
    """Expand a source spec (brace pattern, glob, list of tars, or a folder) into ordered shards."""
    if not spec:
        raise SourceError("no source given (--source 'shards/train-{000000..000009}.tar' or an image folder)")
    patterns = [p for part in _split_top_level(spec) for p in braceexpand(part)]
    if len(patterns) == 1:
        fs, path = open_fs(patterns[0], storage_options)
        if fs.isdir(path):
            return _list_folder(patterns[0], fs, path, folder_shard_size)
    shards, missing = [], []
    for pat in patterns:
        fs, path = open_fs(pat, storage_options)
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
            if not found:
                raise SourceError(f"source pattern {pat!r} matches no file")
            paths = found
        else:
            paths = [path]
        for p in paths:
            try:
                info = fs.info(p)
            except FileNotFoundError:
                missing.append(_unstrip(fs, pat, p))
                continue
            except OSError as e:
                where = _unstrip(fs, pat, p)
                raise storage_error(e, where) or SourceError(f"source shard {where!r} is unreadable: {e}") from e
            name = shard_name(p)
            shards.append(SourceShard(name=name, url=_unstrip(fs, pat, p), size=int(info.get("size") or 0)))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise SourceError(f"source shard {missing[0]!r} does not exist" if len(missing) == 1 else
                          f"{len(missing)} source shards do not exist: {', '.join(map(repr, missing[:5]))}{more}")
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SourceError(f"source shard names must be unique; repeated: {', '.join(dup[:5])}")
    return shards


def shard_name(url: str) -> str:
    """A tar shard's name, as caches and webdataset's __url__ know it: the file name without .tar/.tgz/.tar.gz."""
    return re.sub(r"\.(tar|tgz|tar\.gz)$", "", os.path.basename(url.rstrip("/")))


def _split_top_level(spec: str) -> list[str]:
    """'a-{0..3}.tar,b/{x,y}.tar' -> ['a-{0..3}.tar', 'b/{x,y}.tar']: commas inside braces belong to them."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def _list_folder(url: str, fs, root: str, shard_size: int) -> list[SourceShard]:
    entries = fs.find(root, detail=True)
    files = sorted((p[len(root.rstrip("/")):].lstrip("/"), info["size"])
                   for p, info in entries.items() if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
    if not files:
        raise SourceError(f"image folder {url!r} contains no {'/'.join(IMAGE_EXTS)} files")
    classes = tuple(sorted({f.split("/")[0] for f, _ in files if "/" in f}))
    shards = []
    for i in range(0, len(files), shard_size):
        chunk = files[i:i + shard_size]
        shards.append(SourceShard(name=f"folder-{i // shard_size:06d}", url=url.rstrip("/"),
                                  size=sum(s for _, s in chunk), files=tuple(f for f, _ in chunk), classes=classes))
    return shards


def select(shards: list[SourceShard], which: str | None) -> list[SourceShard]:
    """`--shards`: None (all), 'a:b' (python slice), or 'i,j,k' (indices)."""
    if not which:
        return shards
    try:
        if ":" in which:
            a, b = (int(x) if x else None for x in which.split(":", 1))
            chosen = shards[a:b]
        else:
            chosen = [shards[int(i)] for i in which.split(",")]
    except (ValueError, IndexError) as e:
        raise SourceError(f"--shards {which!r}: expected 'start:stop' or 'i,j,...' within 0..{len(shards) - 1}") from e
    if not chosen and which.split(":") != [which.split(":")[0]] * 2:  # 'a:a' asks for none on purpose
        raise SourceError(f"--shards {which!r} selects none of the {len(shards)} shards (0..{len(shards) - 1})")
    return chosen


def identity(shards: list[SourceShard]) -> dict:
    """Source dataset identity for the fingerprint: shard names and sizes (and folder file lists)."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.name}\t{s.size}\n".encode())
        for f in s.files:
            h.update(f"  {f}\n".encode())
    kind = "folder" if shards and shards[0].files else "tar"
    return {"kind": kind, "shards": len(shards), "digest": h.hexdigest()[:32]}


def changed(shard: SourceShard, size: int | None) -> SourceError | None:
    """The error for a shard whose size is not the one it was listed with (for a cache's shards: when the
    cache was made). Same keys with other pixels would otherwise train on another image's targets."""
    if size is None or not shard.size or size == shard.size:
        return None
    return SourceError(f"source shard {shard.url!r} ({shard.name}) is {size} bytes now but was {shard.size} when it "
                       "was listed (a cache records the sizes it was made from): it changed since, so its images may "
                       "no longer be the ones the targets were computed on")


def check_unchanged(shard: SourceShard, storage_options: dict | None = None) -> None:
    """Raise if a shard's size differs from the recorded one (one stat; folders: one listing)."""
    fs, path = open_fs(shard.url, storage_options)
    try:
        if shard.files:
            sizes = fs.find(path, detail=True)
            size = sum(sizes.get(f"{path.rstrip('/')}/{f}", {}).get("size", 0) for f in shard.files)
        else:
            size = int(fs.size(path))
    except FileNotFoundError:
        raise SourceError(f"source shard {shard.url!r} does not exist") from None
    err = changed(shard, size)
    if err:
        raise err


def iter_samples(shard: SourceShard, storage_options: dict | None = None) -> Iterator[Sample]:
    """Samples of one shard in stored order. Raises SourceError naming the shard if it is unreadable, or if
    its size is not the one it was listed with (tars: before the first sample; folders: at the end)."""
    if shard.files:
        yield from _iter_folder(shard, storage_options)
    else:
        yield from _iter_tar(shard, storage_options)


def _iter_folder(shard: SourceShard, storage_options: dict | None) -> Iterator[Sample]:
    fs, root = open_fs(shard.url, storage_options)
    index = {c: i for i, c in enumerate(shard.classes)}
    seen: set[str] = set()
    total = 0
    for rel in shard.files:
        key = rel.rsplit(".", 1)[0]
        if key in seen:
            raise SourceError(f"{shard.url}/{rel}: key {key!r} appears twice in source shard {shard.name} (two images "
                              "with the same name and different extensions?); keys must be unique")
        seen.add(key)
        try:
            data = fs.cat_file(f"{root.rstrip('/')}/{rel}")
        except OSError as e:
            raise SourceError(f"{shard.url}/{rel}: unreadable: {e}") from e
        total += len(data)
        label = index.get(rel.split("/")[0]) if "/" in rel else None
        yield Sample(key=key, data=data, label=label)
    err = changed(shard, total)
    if err:
        raise err


def split_member(name: str) -> tuple[str, str]:
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _make_sample(key: str, members: dict[str, bytes]) -> Sample:
    data = next((members[e] for e in IMAGE_EXTS if e in members), None)
    label, meta = None, {}
    if "cls" in members:
        try:
            label = int(members["cls"].decode().strip())
        except ValueError:
            meta["cls_error"] = "unparseable .cls"
    if "json" in members:
        try:
            meta.update(json.loads(members["json"].decode()))
        except (ValueError, UnicodeDecodeError):
            meta["json_error"] = "unparseable .json"
    return Sample(key=key, data=data, label=label, meta=meta)


def _iter_tar(shard: SourceShard, storage_options: dict | None) -> Iterator[Sample]:
    fs, path = open_fs(shard.url, storage_options)
    key, members, last, seen = None, {}, None, set()
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            size = getattr(f, "size", None) or fs.size(path)  # now, not when the shard was listed
            err = changed(shard, size)
            if err:
                raise err
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = split_member(m.name)
                if k != key and key is not None:
                    yield _make_sample(key, members)
                    last, members = key, {}
                if (k != key and k in seen) or ext in members:  # one reading for extract, verify and training
                    raise SourceError(f"source shard {shard.url!r}: key {k!r} appears twice (member {m.name!r}); "
                                      "keys must be unique within a shard")
                key = k
                seen.add(k)
                members[ext] = tf.extractfile(m).read()
            plain = getattr(tf.fileobj, "comptype", "tar") == "tar" and "http" not in str(fs.protocol)
            if plain and size is not None and size < tf.offset + 2 * tarfile.BLOCKSIZE:
                # A tar cut at (or inside) a member header reads as a shorter, valid archive: only the
                # missing end-of-archive blocks tell. (Compressed streams fail on their own checksums.)
                raise SourceError(f"source shard {shard.url!r} is truncated: it ends at byte {size}, before the "
                                  f"end-of-archive marker (after sample {key!r}); samples after it are lost")
    except FileNotFoundError:
        raise SourceError(f"source shard {shard.url!r} does not exist") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        where = f"after sample {last!r}" if last else "at its start"
        raise SourceError(f"source shard {shard.url!r} is truncated or corrupt ({where}): {e}") from e
    if key is not None:
        yield _make_sample(key, members)
