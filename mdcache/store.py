"""The cache on disk or in a bucket: identity, layout, atomic commits, and the reader.

    <root>/<cache-id>/manifest.json            fingerprint, codec + calibration, shapes, source shards
    <root>/<cache-id>/calibration/<name>-<sha> a calibration's arrays (pca's basis), content-addressed
    <root>/<cache-id>/shards/<name>.<attempt>/ one Zarr v3 group per source shard (written first)
    <root>/<cache-id>/commits/<name>.json      the shard's commit record (written last, atomically)

A shard exists for readers only once its commit record exists; the record names the attempt
directory it vouches for and carries per-view checksums. Nothing here is pickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import codecs, local_copies
from . import fs as mfs
from . import views as views_mod
from .errors import CacheError, CacheNotFound, UserError
from .fs import is_local, join, now, read_json, read_json_many, url_to_fs, who, write_json
from .lazy import lazy

torch = lazy("torch")

FORMAT_VERSION = 2   # 2: K is not part of the identity (caches grow), records are commits/<shard>@<K>.json
READABLE = (1, 2)
CALIB_VIEWS = 2      # a calibration sees the first views of its images, whatever K: growing K keeps it
MANIFEST = "manifest.json"
COMMIT_INDEX = "commit-index.json"   # a compacted copy of the commit records: opening a cache is O(1) requests
COMMITS = "commits"                  # commit records: <shard>@<K>.json
CLAIMS = "claims"                    # shard claims of live jobs: <shard>.json
SHARDS = "shards"                    # shard attempts: <shard>.<attempt>/
CALIBRATION = "calibration"          # codec calibration arrays (pca's basis)
WRITE_THREADS = 4  # chunks compressed, hashed and written at once per shard
VIEW_FIELD_COUNT = 11
# What every reader relies on in a commit record (the rest is provenance).
RECORD_FIELDS = {"shard": str, "path": str, "samples": int, "views": int, "checksums": dict, "keys_sha256": str}


# ----------------------------------------------------------------------------- paths (the store names them all)

def record_file(cache_path: str, stem: str) -> str:
    """The commit record `stem` (<shard>@<K>) of a cache folder."""
    return join(cache_path, COMMITS, f"{stem}.json")


def claim_file(cache_path: str, shard: str) -> str:
    return join(cache_path, CLAIMS, f"{shard}.json")


# ----------------------------------------------------------------------------- identity

def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def cache_id(fingerprint: dict) -> str:
    """Same producer -> same id. 16 hex chars of sha256 over the canonical fingerprint."""
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()[:16]


def array_digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).data).hexdigest()


def json_digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _record_name(path: str) -> str:
    """A commit record's stem: commits/<stem>.json, the stem <shard>@<K> (format 2) or <shard> (format 1)."""
    return path.rstrip("/").rsplit("/", 1)[-1][:-len(".json")]


def shard_of(stem: str) -> str:
    """The shard of a record stem: <shard>@<K> (format 2; a shard name may hold '@' itself) or <shard>."""
    head, _, k = stem.rpartition("@")
    return head if head and k.isdigit() else stem


def stem_of(shard: str, views: int) -> str:
    """The record stem of a shard with K views in format 2: one record per (shard, K), a cache grows by new ones."""
    return f"{shard}@{views}"


def record_stem(rec: dict) -> str:
    """The file a record is committed as (commits/<stem>.json)."""
    return stem_of(rec["shard"], rec["views"]) if rec.get("format_version", 1) >= 2 else rec["shard"]


def check_record(rec: Any, name: str, where: str) -> dict:
    """A commit record as readers need it (for shard `name`), or a CacheError naming the file: a record of
    the wrong shape must not crash a reader, nor send gc after another shard's data."""
    if not isinstance(rec, dict):
        raise CacheError(f"{where}: not a commit record (a JSON {type(rec).__name__}): damaged")
    bad = [k for k, t in RECORD_FIELDS.items() if not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)]
    if not bad and record_stem(rec) != name:  # the record of another shard (or K) under this name
        bad = [f"shard {rec['shard']!r}"]
    if not bad and not rec["path"].startswith(f"{SHARDS}/{rec['shard']}."):
        bad = [f"path {rec['path']!r}"]
    if not bad and (rec["views"] < 1 or rec["samples"] < 0 or any(
            not isinstance(v, list) or len(v) != rec["views"] for v in rec["checksums"].values())):
        bad = ["views/samples/checksums"]
    if bad:
        raise CacheError(f"{where}: the commit record of shard {name!r} is damaged ({', '.join(bad)})")
    return rec


# ----------------------------------------------------------------------------- writing

CALIB_IMAGES = 64  # the default calibration size: never change it (caches made with it leave it out of their id)


def codec_identity(codec: str, calib_images: int = CALIB_IMAGES) -> dict:
    """The codec part of a fingerprint. A calibrated codec's targets depend on how many images calibrated
    it, so a count other than the default is part of the identity (the default is left out, so that caches
    made before this rule keep their ids)."""
    c = codecs.get_codec(codec)
    if c.calibrate is None or calib_images == CALIB_IMAGES:
        return c.identity
    return {**c.identity, "calib_images": calib_images}


def fingerprint(teacher, recipe, shards: list, codec: str, precision: str, calib_images: int = CALIB_IMAGES,
                views_of: str | None = None) -> dict:
    """What produced the targets, and nothing about how the work was run: its hash is the cache id.
    teacher: a `teachers.Teacher`, recipe: a `views.ViewRecipe`, shards: all `sources.SourceShard`s;
    views_of: the id of the cache whose stored views were replayed (extract --views-of)."""
    from .sources import identity as source_identity

    views = {k: v for k, v in recipe.identity().items() if k != "views"}  # K may grow: not part of the identity
    if views_of:
        views["views_of"] = views_of
    return {"format_version": FORMAT_VERSION, "teacher": {**teacher.identity, "precision": precision},
            "views": views, "source": source_identity(shards), "codec": codec_identity(codec, calib_images)}


def views_of(manifest: dict) -> str | None:
    """The id of the cache that drew the views a cache replays (extract --views-of), or None: it drew them."""
    return manifest["fingerprint"]["views"].get("views_of")


def views_root(manifest: dict) -> str:
    """The id of the cache that drew a cache's views: the one it replays (--views-of), the root its source
    had (a transcoded cache has its source's views), or itself. Caches with one root line up view by view."""
    fp = manifest["fingerprint"]
    return (manifest.get("views_drawn_by") or views_of(manifest) or fp.get("transcoded_from", {}).get("cache_id")
            or manifest["cache_id"])


def new_manifest(fp: dict, teacher, recipe, source_spec: str, shards: list, calibration: dict | None) -> dict:
    """The manifest of a new cache: its fingerprint plus what readers need (codec arrays and calibration,
    target shapes, view fields, source shards) and provenance."""
    from .views import VIEW_FIELDS

    return {"format_version": FORMAT_VERSION, "cache_id": cache_id(fp), "fingerprint": fp,
            "codec": codec_record(codec_name(fp), calibration, teacher.num_patches, teacher.dim),
            "teacher": {"spec": teacher.spec, "dim": teacher.dim, "patch_grid": list(teacher.patch_grid),
                        "tokens": teacher.num_patches, "mean": list(teacher.mean), "std": list(teacher.std)},
            "views": recipe.views, "image_size": recipe.image_size, "view_fields": list(VIEW_FIELDS),
            "source": {"spec": source_spec, "shards": [s.to_json() for s in shards],
                       "classes": list(shards[0].classes)},
            "created_by": who(), "created_at": now(), "versions": software_versions()}


def codec_record(name: str, calibration: dict | None, tokens: int, dim: int) -> dict:
    """The manifest's codec entry: name, calibration (JSON; arrays by reference) and its checksum, and the
    arrays a shard holds with their per-view shapes (None: the shard's sample count)."""
    shapes = codecs.get_codec(name).shapes(tokens, dim)
    return {"name": name, "calibration": calibration, "calibration_sha256": json_digest(calibration),
            "arrays": {n: [dt, [None, *shape]] for n, (dt, shape) in shapes.items()}}


def codec_name(fp: dict) -> str:
    """The codec's name (as --codec takes it) from a fingerprint's codec identity."""
    c = fp["codec"]
    return f"{c['name']}:{c['components']}" if "components" in c else c["name"]


def _zarr_at(cache_url: str, rel: str, storage_options: dict | None) -> tuple[str, dict | None]:
    """Where zarr opens `rel` under a cache, and with which storage options (none for local paths)."""
    fs, path = url_to_fs(cache_url, storage_options)
    if is_local(fs):
        return join(path, rel), None
    return join(cache_url, rel), mfs.storage_options_for(cache_url, storage_options)


def _read_array(where: str, so: dict | None) -> np.ndarray | None:
    import zarr

    try:
        return np.asarray(zarr.open_array(where, mode="r", storage_options=so)[...])
    except Exception:  # absent or undecodable
        return None


def put_calibration(cache_url: str, calibration: dict | None, storage_options: dict | None = None) -> dict | None:
    """Store a calibration's numpy arrays as Zarr arrays beside the manifest and return the JSON the manifest
    holds: each array replaced by {"array": path, "sha256", "shape", "dtype"}. Each creator writes its own
    copy under a fresh name (content digest + a random suffix), so no creator ever deletes, truncates or
    overwrites an array another one is writing or a reader is reading; the first manifest names the copy
    that counts, and `mdcache gc` removes the others (and a killed creator's half-written one)."""
    import zarr

    if not calibration:
        return calibration
    out = {}
    for key, value in calibration.items():
        if not isinstance(value, np.ndarray):
            out[key] = value
            continue
        digest = array_digest(value)
        rel = f"{CALIBRATION}/{key}-{digest[:16]}-{uuid.uuid4().hex[:8]}"
        where, so = _zarr_at(cache_url, rel, storage_options)
        try:
            z = zarr.open_array(where, mode="w-", shape=value.shape, dtype=value.dtype, chunks=value.shape,
                                zarr_format=3, storage_options=so)
            z[...] = value
        except OSError as e:
            raise CacheError(f"{cache_url}: writing the codec calibration {rel} failed: {e.strerror or e}") from e
        out[key] = {"array": rel, "sha256": digest, "shape": list(value.shape), "dtype": str(value.dtype)}
    return out


def calibration_arrays(calibration: dict | None) -> dict[str, dict]:
    """The calibration entries that are array references (pca's basis): {key: {"array": path, ...}}."""
    return {k: v for k, v in (calibration or {}).items() if isinstance(v, dict) and "array" in v}


def committed_files(cache: "Cache") -> list[str]:
    """Every file a reader of the cache needs, relative to its folder: manifest, calibration arrays, every
    commit record (each K of a growing shard) and the data it names. What a copy of the cache must take."""
    fs, path = url_to_fs(cache.url, cache.storage_options)
    base = path.rstrip("/") + "/"
    folders = [ref["array"] for ref in calibration_arrays(cache.manifest["codec"]["calibration"]).values()]
    files = [MANIFEST, *(f"commits/{stem}.json" for stem in cache.records)]
    folders += sorted({rec["path"] for rec in cache.records.values()})
    for folder in folders:
        files += [p[len(base):] if p.startswith(base) else p for p in fs.find(join(path, folder))]
    return files


def load_calibration(cache_url: str, calibration: dict | None, storage_options: dict | None = None) -> dict | None:
    """The manifest's calibration with its arrays read back and checked against their checksums."""
    out = dict(calibration or {})
    for key, ref in calibration_arrays(calibration).items():
        where, so = _zarr_at(cache_url, ref["array"], storage_options)
        a = _read_array(where, so)  # written whole before the manifest naming it was published
        if a is None:
            raise CacheError(f"{cache_url}: the codec calibration array {ref['array']} is missing or unreadable")
        if array_digest(a) != ref["sha256"] or list(a.shape) != ref["shape"] or str(a.dtype) != ref["dtype"]:
            raise CacheError(f"{cache_url}: the codec calibration array {ref['array']} does not match its checksum "
                             "in the manifest (edited or damaged)")
        out[key] = a
    return out if calibration is not None else None


def software_versions() -> dict:
    import open_clip
    import PIL
    import timm

    from . import __version__
    return {"mdcache": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def create_manifest(cache_url: str, manifest: dict, storage_options: dict | None = None) -> dict:
    """Publish the manifest unless one exists; return the one that is there (first writer wins)."""
    fs, path = url_to_fs(cache_url, storage_options)
    mpath = join(path, MANIFEST)
    if not write_json(fs, mpath, manifest, exclusive=True):
        existing = read_json(fs, mpath)
        if existing.get("fingerprint") != manifest["fingerprint"]:
            raise CacheError(f"{cache_url}: an existing manifest has a different fingerprint "
                             "(cache made by another teacher/recipe/codec under the same id?)")
        return existing
    return manifest


def remove_attempt(cache_url: str, rel: str, storage_options: dict | None = None) -> None:
    """Best effort: remove an attempt directory this process wrote and will never commit (all its writes have
    ended: `write_shard_data` waits for every chunk before it gives up on one)."""
    fs, path = url_to_fs(cache_url, storage_options)
    try:
        fs.rm(join(path, rel), recursive=True)
    except FileNotFoundError:
        pass
    except OSError:  # the store is down: `mdcache gc` removes it later
        pass


def _stamp(info: dict) -> str:
    """What identifies one version of a listed file: S3's ETag, else size and modification time."""
    etag = info.get("ETag") or info.get("etag")
    return f"{info.get('size')}:{etag.strip(chr(34)) if etag else info.get('mtime') or info.get('LastModified')}"


def publish(cache_url: str, record: dict, storage_options: dict | None = None) -> bool:
    """Commit a written attempt; True if its record is the one that stands. A refused or failed commit is
    read back before anything is removed: a retried PUT whose first reply was lost lands and is then
    refused, and the data it names must stay. Otherwise the attempt is garbage and is removed."""
    stem = record_stem(record)
    try:
        won = commit_shard(cache_url, record, storage_options)
    except OSError as e:
        if committed_path(cache_url, stem, storage_options) == record["path"]:
            return True
        remove_attempt(cache_url, record["path"], storage_options)
        raise CacheError(f"{cache_url}: committing shard {record['shard']} failed: {e.strerror or e} "
                         f"({type(e).__name__}); nothing of it was committed") from e
    if won or committed_path(cache_url, stem, storage_options) == record["path"]:
        return True
    remove_attempt(cache_url, record["path"], storage_options)  # another extractor committed this shard first
    return False


def committed_path(cache_url: str, stem: str, storage_options: dict | None = None) -> str | None:
    """The attempt a commit record (commits/<stem>.json) names now (None: none): read back, not listed."""
    fs, path = url_to_fs(cache_url, storage_options)
    try:
        return read_json(fs, record_file(path, stem)).get("path")
    except (FileNotFoundError, CacheError):
        return None


def drop_commit(cache_url: str, stem: str, attempt: str, storage_options: dict | None = None) -> None:
    """Withdraw a commit record whose data (`attempt`) is gone, so that the shard is computed again; only if
    the record still names that attempt (another extractor may have repaired it already)."""
    fs, path = url_to_fs(cache_url, storage_options)
    if committed_path(cache_url, stem, storage_options) == attempt:
        try:
            fs.rm(record_file(path, stem))
        except FileNotFoundError:
            pass


def commit_shard(cache_url: str, record: dict, storage_options: dict | None = None) -> bool:
    """Publish a commit record, create-if-absent: False if another writer committed this (shard, K) first."""
    fs, path = url_to_fs(cache_url, storage_options)
    return write_json(fs, record_file(path, record_stem(record)), record, exclusive=True)


def write_shard_data(cache_url: str, name: str, keys: list[str], arrays: dict[str, np.ndarray],
                     views: np.ndarray, extra: dict, storage_options: dict | None = None) -> dict:
    """Write one shard's arrays ([K, N, ...] each) into a fresh attempt directory (invisible to readers
    until commit_shard) and return its commit record."""
    import zarr
    from zarr.codecs import BloscCodec

    fs, path = url_to_fs(cache_url, storage_options)
    attempt = f"{name}.{uuid.uuid4().hex[:12]}"
    group_url = join(cache_url, SHARDS, attempt)
    if is_local(fs):
        group_url = join(path, SHARDS, attempt)
    checksums, n = {}, len(keys)
    try:
        so = None if is_local(fs) else mfs.storage_options_for(cache_url, storage_options)
        group = zarr.open_group(group_url, mode="w", zarr_format=3, storage_options=so)
        jobs = []
        with ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="mdcache-chunks") as pool:
            for arr_name, data in list(arrays.items()) + [("views", views)]:
                chunks = (1, max(n, 1)) + data.shape[2:]  # one chunk = one view of the shard: one sequential read
                z = group.create_array(arr_name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                       compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                                       fill_value=0)
                # views are compressed, hashed and written in parallel (zstd and sha256 release the GIL)
                jobs += [pool.submit(z.__setitem__, k, data[k]) for k in range(data.shape[0] if data.size else 0)]
                checksums[arr_name] = [pool.submit(array_digest, data[k]) for k in range(data.shape[0])]
            wait(jobs)  # every chunk has landed or failed before anything is cleaned up: no late writes
        for job in jobs:
            job.result()
        checksums = {a: [f.result() for f in fs_] for a, fs_ in checksums.items()}
        group.attrs.update({"keys": keys, "shard": name})
    except OSError as e:  # disk full, file too large, the bucket went away: say where, leave no half-written attempt
        remove_attempt(cache_url, f"{SHARDS}/{attempt}", storage_options)
        raise CacheError(f"{cache_url}: writing shard {name} failed: {e.strerror or e} "
                         f"({type(e).__name__}); nothing of it was committed") from e
    try:
        nbytes = int(fs.du(join(path, SHARDS, attempt)))  # one listing now, so that `info` needs none per shard
    except OSError:
        nbytes = None
    record = {"shard": name, "path": f"{SHARDS}/{attempt}", "samples": n, "views": int(views.shape[0]), "bytes": nbytes,
              "keys_sha256": keys_digest(keys), "checksums": checksums, "created_by": who(),
              "created_at": now(), "format_version": FORMAT_VERSION, **extra}
    return record


# ----------------------------------------------------------------------------- reading

@dataclass
class Cache:
    """A committed cache: its manifest, its committed shards, and read access to them."""

    url: str
    manifest: dict
    storage_options: dict | None = None
    commits: dict[str, dict] = field(default_factory=dict)   # shard -> its record with the most views
    records: dict[str, dict] = field(default_factory=dict)   # every commit record, by file stem
    local_cache: str | None = None          # read-through copy of remote shards on this machine
    unindexed: int = 0                      # records the last refresh read one by one (not in the index)
    _stamps: dict[str, str] = field(default_factory=dict, repr=False)
    _in_index: set[str] = field(default_factory=set, repr=False)  # records the on-disk index holds as they are
    local_cache_bytes: int = 100 * 2**30    # bound on that copy (least recently used shards go first)
    index_problems: list[str] = field(default_factory=list)  # where commit-index.json was damaged or wrong
    _calib: dict = field(default_factory=dict, repr=False)  # the calibration: loaded, and per device
    _warned_local: bool = field(default=False, repr=False)

    def __getstate__(self) -> dict:
        """Loader workers get the cache without its per-device calibration copies: GPU tensors must not be
        pickled into (spawned) workers; each process makes its own once."""
        state = dict(self.__dict__)
        state["_calib"] = {k: v for k, v in self._calib.items() if k == "calibration"}
        return state

    @property
    def codec(self) -> str:
        return self.manifest["codec"]["name"]

    @property
    def calibration(self) -> dict | None:
        """The codec's calibration, its arrays (if any) read once and checked."""
        if "calibration" not in self._calib:
            self._calib["calibration"] = load_calibration(self.url, self.manifest["codec"].get("calibration"),
                                                          self.storage_options)
        return self._calib["calibration"]

    def calibration_on(self, device) -> dict | None:
        """The calibration as tensors on `device`, made once per device: decoding in a training step
        must not copy a basis to the accelerator every batch."""
        device = torch.device(device)
        if device not in self._calib:
            c = self.calibration
            self._calib[device] = None if c is None else {
                k: torch.as_tensor(np.asarray(v, dtype=np.float32), device=device)
                if isinstance(v, (list, np.ndarray)) else v for k, v in c.items()}
        return self._calib[device]

    @property
    def cache_id(self) -> str:
        return self.manifest["cache_id"]

    @property
    def teacher_dim(self) -> int:
        return int(self.manifest["teacher"]["dim"])

    @property
    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.manifest["teacher"]["patch_grid"])  # type: ignore[return-value]

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def replay(self) -> str:
        """The view replay implementation the cache was extracted with: every reader replays with it."""
        return views_mod.check_replay(self.manifest["fingerprint"]["views"]["replay"])

    @property
    def format_version(self) -> int:
        return int(self.manifest.get("format_version", 1))

    @property
    def views(self) -> int:
        """Stored views every committed shard has (K): a cache that grows has shards with more while it grows."""
        if not self.commits:
            return int(self.manifest["views"])
        return min(int(r["views"]) for r in self.commits.values())

    def views_text(self) -> str:
        """K for people: "8", or "2-8 (growing)" while some shards have more views than others."""
        ks = sorted({int(r["views"]) for r in self.commits.values()}) or [int(self.manifest["views"])]
        return str(ks[0]) if len(ks) == 1 else f"{ks[0]}-{ks[-1]} (growing)"

    @property
    def teacher_spec(self) -> str:
        """The --teacher the cache was made with (e.g. clip-b16)."""
        return self.manifest["teacher"]["spec"]

    @property
    def teacher_identity(self) -> dict:
        """The teacher part of the fingerprint (arch, weights digest, tap, size, init seed)."""
        return self.manifest["fingerprint"]["teacher"]

    @property
    def source_shards(self) -> list[dict]:
        return self.manifest["source"]["shards"]

    def sources(self) -> list:
        """The source shards as `sources.SourceShard`s, in source order."""
        from .sources import SourceShard

        classes = tuple(self.manifest["source"].get("classes", ()))
        return [SourceShard.from_json(s, classes) for s in self.source_shards]

    @property
    def shard_names(self) -> list[str]:
        """Committed shards, in source order."""
        return [s["name"] for s in self.source_shards if s["name"] in self.commits]

    @property
    def complete(self) -> bool:
        return len(self.commits) == len(self.source_shards)

    def refresh(self, records: bool = False) -> "Cache":
        """Re-read the committed shards: one listing of commits/ (the truth: a record exists or not), the
        compacted index for every record whose file is unchanged since it was indexed, and one concurrent
        batch of GETs for the rest. Opening a 1000-shard cache costs a few requests, not 1000.

        records=True reads every commit record itself and trusts the index for nothing (verify, gc, rm and
        extract: whatever decides what to delete or redo). Where the index disagrees with a record it is
        named in `index_problems`, and `write_index` repairs it."""
        fs, path = url_to_fs(self.url, self.storage_options)
        cdir = join(path, COMMITS)
        fs.invalidate_cache(cdir)  # listings are cached per process; other writers change them
        try:
            listing = {p["name"]: _stamp(p) for p in fs.ls(cdir, detail=True) if p["name"].endswith(".json")}
        except FileNotFoundError:
            listing = {}
        first = not self._stamps
        if first or records:  # the compacted index; later refreshes (a waiting extractor's polls) reuse what they hold
            known = self._read_index(fs, path) if listing else {}
        else:
            known = {n: {"stamp": self._stamps[n], "record": r} for n, r in self.records.items() if n in self._stamps}
        found, stamps, todo = {}, {}, []
        for p, stamp in listing.items():
            stem = _record_name(p)
            hit = known.get(stem)
            if hit is not None and hit.get("stamp") == stamp and not records:
                found[stem], stamps[stem] = hit["record"], stamp
            else:
                todo.append(p)
        for p, rec in read_json_many(fs, todo).items():  # new since the index (or the last refresh), or replaced
            stem = _record_name(p)
            found[stem], stamps[stem] = check_record(rec, stem, fs.unstrip_protocol(p)), listing[p]
        if first or records:
            self._in_index = {n for n in found if n in known and known[n].get("stamp") == stamps[n]}
        if records:  # the index vouched for these records as they are: does it say what they say?
            self.index_problems += [f"shard {shard_of(n)}: the index holds another record than {COMMITS}/{n}.json"
                                    for n in sorted(self._in_index) if known[n]["record"] != found[n]]
            self._in_index -= {n for n in self._in_index if known[n]["record"] != found[n]}
        self.records, self._stamps = found, stamps
        self.commits = {}  # per shard, the record with the most views (a grown shard has one per step)
        for rec in sorted(found.values(), key=lambda r: r["views"]):
            self.commits[rec["shard"]] = rec
        self.unindexed = sum(n not in self._in_index for n in found)  # records the on-disk index lacks
        return self

    def _read_index(self, fs, path: str) -> dict:
        """The index's valid entries. A damaged index (or entry) is only a lost shortcut: its records are read
        one by one, and what was wrong is kept in `index_problems` so that the next writer rewrites it."""
        where = fs.unstrip_protocol(join(path, COMMIT_INDEX))
        try:
            index = read_json(fs, join(path, COMMIT_INDEX))
        except FileNotFoundError:
            return {}
        except CacheError as e:
            print(f"warning: {e}; reading the commit records one by one", file=sys.stderr)
            self.index_problems.append(str(e))
            return {}
        if index.get("format_version") != self.format_version:
            return {}
        entries = index.get("records")
        if not isinstance(entries, dict):
            self.index_problems.append(f"{where}: 'records' is a {type(entries).__name__}, not an object")
            print(f"warning: {self.index_problems[-1]}; reading the commit records one by one", file=sys.stderr)
            return {}
        good = {}
        for name, entry in entries.items():
            try:
                if not isinstance(entry, dict) or not isinstance(entry.get("stamp"), str):
                    raise CacheError(f"{where}: entry {name!r} is not {{stamp, record}}")
                check_record(entry.get("record"), name, f"{where} (entry {name!r})")
            except CacheError as e:
                self.index_problems.append(str(e))
                continue
            good[name] = entry
        if len(good) < len(entries):
            print(f"warning: {where}: {len(entries) - len(good)} damaged entries ({self.index_problems[-1]}); "
                  "reading those commit records one by one", file=sys.stderr)
        return good

    @property
    def index_stale(self) -> bool:
        """The index lacks records, or was damaged or wrong: the next writer (or verify) rewrites it."""
        return bool(self.unindexed or self.index_problems)

    def write_index(self) -> bool:
        """Compact the commit records read by the last refresh into one file (best effort: a reader with
        read-only credentials, or a store that is down, simply keeps reading the records)."""
        fs, path = url_to_fs(self.url, self.storage_options)
        index = {"format_version": self.format_version, "written_at": now(),
                 "records": {n: {"stamp": self._stamps[n], "record": r} for n, r in self.records.items()}}
        try:
            write_json(fs, join(path, COMMIT_INDEX), index)
        except OSError:
            return False
        self._in_index, self.unindexed, self.index_problems = set(self.records), 0, []
        return True

    def _reload_record(self, shard: str) -> bool:
        """After a failed read: the shard's commit record itself, in case the index was wrong about it. True if
        it differed (the read is worth retrying). Repair advice is only ever given from the record itself."""
        fs, path = url_to_fs(self.url, self.storage_options)
        stem = record_stem(self.commits[shard])
        where = fs.unstrip_protocol(record_file(path, stem))
        try:
            rec = check_record(read_json(fs, record_file(path, stem)), stem, where)
        except FileNotFoundError:
            held = self.commits[shard]
            grown = self.refresh().commits.get(shard)  # the listing again: a grown record, or none
            if grown is not None and grown["views"] > held["views"]:  # opened before the growth, `gc --superseded`
                print(f"warning: {where} was superseded by growth and removed: reading shard {shard} from "
                      f"{COMMITS}/{record_stem(grown)}.json (its first views are the same)", file=sys.stderr)
                return True
            raise CacheError(f"{self.url}: shard {shard!r} is no longer committed (its record {where} was "
                             "removed, e.g. by `mdcache rm --shard`); re-run the same `mdcache extract` to recompute "
                             "it") from None
        if rec == self.commits.get(shard):
            return False
        print(f"warning: {self.url}/{COMMIT_INDEX} was wrong about shard {shard}: using its commit record "
              "(`mdcache verify` rewrites the index)", file=sys.stderr)
        self.commits[shard] = self.records[stem] = rec
        self.index_problems.append(f"shard {shard}: the index holds another record than {COMMITS}/{stem}.json")
        return True

    @property
    def array_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{array: (dtype, per-sample shape)} of every array a shard holds: what a read must find."""
        m = self.manifest
        specs = codecs.get_codec(self.codec).shapes(int(m["teacher"]["tokens"]), self.teacher_dim)
        return {**specs, "views": ("int32", (len(m.get("view_fields", VIEW_FIELD_COUNT * [0])),))}

    def _open_group(self, shard: str):
        import zarr

        fs, path = url_to_fs(self.url, self.storage_options)
        rel = self.commits[shard]["path"]
        if is_local(fs):
            return zarr.open_group(join(path, rel), mode="r")
        return zarr.open_group(join(self.url, rel), mode="r",
                               storage_options=mfs.storage_options_for(self.url, self.storage_options))

    def missing_data(self) -> list[str]:
        """Committed shards whose data directory is gone, from one listing of shards/ (not a request per shard)."""
        fs, path = url_to_fs(self.url, self.storage_options)
        sdir = join(path, SHARDS)
        fs.invalidate_cache(sdir)
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(sdir, detail=False)} if fs.exists(sdir) else set()
        return sorted(name for name, rec in self.commits.items() if rec["path"].rsplit("/", 1)[-1] not in present)

    def keys(self, shard: str) -> list[str]:
        return self.read_encoded(shard, 0, targets=False)[0]

    def _local_copy_path(self, shard: str) -> str | None:
        """Where this machine's copy of a remote shard lives (with local_cache), else None."""
        if not self.local_cache or is_local(url_to_fs(self.url, self.storage_options)[0]):
            return None
        return os.path.join(self.local_cache, self.manifest["cache_id"], self.commits[shard]["path"])

    def read_encoded(self, shard: str, view: int, check: bool = True,
                     targets: bool = True) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
        """(keys, encoded arrays for that view [N, ...], view params int32 [N, 11]): one sequential read each.
        targets=False reads only keys and view params (an images-only loader).

        A read that fails is retried once against the shard's commit record itself when the index said
        something else; a local copy (local_cache) that fails is never reported against the bucket."""
        if shard not in self.commits:
            raise CacheError(f"{self.url}: shard {shard!r} is not committed "
                             f"({len(self.commits)}/{len(self.source_shards)} shards committed)")
        if isinstance(view, bool) or not isinstance(view, (int, np.integer)):
            raise CacheError(f"{self.url}: view {view!r} is not a view index (an integer from 0 to {self.views - 1})")
        if not 0 <= view < self.commits[shard]["views"]:
            raise CacheError(f"{self.url}: shard {shard!r} has {self.commits[shard]['views']} views, "
                             f"asked for view {view}")
        try:
            return self._read(shard, int(view), check, targets)
        except CacheError:
            if not self._reload_record(shard):
                raise
        return self._read(shard, int(view), check, targets)

    def _read(self, shard: str, view: int, check: bool, targets: bool):
        copy = self._local_copy_path(shard)
        if copy is None:
            return self._read_view(shard, view, check, targets, self.url, lambda: self._open_group(shard))
        import zarr

        out = None
        fs, path = url_to_fs(self.url, self.storage_options)
        try:
            with local_copies.reading(copy):
                try:
                    local_copies.ensure(fs, join(path, self.commits[shard]["path"]), copy)
                except FileNotFoundError:
                    return self._read_view(shard, view, check, targets, self.url, lambda: self._open_group(shard))
                try:
                    out = self._read_view(shard, view, check, targets, f"{copy} (local copy of {self.url})",
                                          lambda: zarr.open_group(copy, mode="r"))
                except CacheError as e:  # this machine's copy: the bucket decides below whether the shard is bad
                    print(f"warning: {e}; reading the shard from {self.url} and fetching the copy again",
                          file=sys.stderr)
                    local_copies.drop(copy)
        except local_copies.LocalCopyError as e:
            if not self._warned_local:
                print(f"warning: {e}; reading shards from the bucket directly", file=sys.stderr)
                self._warned_local = True
            copy = None
        if out is None:
            out = self._read_view(shard, view, check, targets, self.url, lambda: self._open_group(shard))
        local_copies.evict_lru(self.local_cache, self.local_cache_bytes, keep=copy)
        return out

    def _read_view(self, shard: str, view: int, check: bool, targets: bool, where: str, open_group):
        rec = self.commits[shard]
        try:
            group = open_group()
            keys = list(group.attrs["keys"])
        except FileNotFoundError:
            raise CacheError(f"{where}: shard {shard} is committed but its data {rec['path']} is missing (deleted?); "
                             "re-run the same `mdcache extract` to recompute it") from None
        except Exception as e:  # a damaged zarr.json
            raise CacheError(f"{where}: shard {shard!r} is unreadable: {e}") from e
        made_with = rec.get("calibration_sha256")  # records before it existed: nothing to compare
        if made_with is not None and made_with != self.manifest["codec"].get("calibration_sha256"):
            raise CacheError(f"{where}: shard {shard!r} was encoded with another codec calibration than this cache's "
                             f"manifest holds (record {made_with[:12]}, manifest "
                             f"{str(self.manifest['codec'].get('calibration_sha256'))[:12]}): it comes from another "
                             "cache with the same id (two roots merged?). Remove it with `mdcache rm --shard "
                             f"{shard}` and extract it again")
        specs, out = self.array_specs, {}
        for name in (list(codecs.get_codec(self.codec).arrays(self.teacher_dim)) if targets else []) + ["views"]:
            dtype, shape = specs[name]
            try:
                arr = group[name]
                found = (str(arr.dtype), tuple(arr.shape))
            except Exception as e:  # missing array metadata
                raise CacheError(f"{where}: shard {shard!r} array {name!r} is unreadable: {e}") from e
            if found != (dtype, (rec["views"], rec["samples"], *shape)):
                raise CacheError(f"{where}: shard {shard!r} array {name!r} is {found[0]} {list(found[1])}, but the "
                                 f"{self.codec} cache stores {dtype} {[rec['views'], rec['samples'], *shape]} "
                                 "(its zarr.json was edited or damaged): re-extract it with `mdcache extract` after "
                                 f"`mdcache rm --shard {shard}`")
            try:
                a = arr[view]
            except Exception as e:  # undecodable chunk, missing file
                raise CacheError(f"{where}: shard {shard!r} array {name!r} view {view} is unreadable: {e}") from e
            if check and array_digest(a) != rec["checksums"][name][view]:
                raise CacheError(f"{where}: shard {shard!r} array {name!r} view {view}: checksum mismatch "
                                 "(corrupt cache shard; re-extract it with `mdcache extract` after `mdcache rm "
                                 f"--shard {shard}`)")
            out[name] = a
        if check and keys_digest(keys) != rec["keys_sha256"]:
            raise CacheError(f"{where}: shard {shard!r}: sample keys do not match the commit record")
        return keys, out, out.pop("views")

    def decode(self, arrays: dict[str, Any]) -> torch.Tensor:
        """Encoded arrays (numpy or tensors on any device) -> float32 targets on the same device."""
        tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
        device = next(iter(tensors.values())).device
        return codecs.get_codec(self.codec).decode(tensors, self.calibration_on(device))

    def read(self, shard: str, view: int, check: bool = True) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(keys, targets float32 [N, P, D], view params int32 [N, 11])."""
        keys, arrays, views = self.read_encoded(shard, view, check=check)
        return keys, self.decode(arrays).numpy(), views

    def stats(self) -> dict:
        """Completeness, sizes and fidelity aggregated over committed shards."""
        meter = codecs.FidelityMeter()
        samples = skipped = 0
        for rec in self.commits.values():
            meter.merge(rec.get("fidelity", {}))
            samples += rec["samples"]
            skipped += len(rec.get("skipped", []))
        fs, path = url_to_fs(self.url, self.storage_options)

        def size(rec: dict) -> int:
            try:  # recorded at commit; caches from before that are measured (a listing per shard)
                return rec["bytes"] if rec.get("bytes") is not None else fs.du(join(path, rec["path"]))
            except FileNotFoundError:
                return 0
        nbytes = sum(size(rec) for rec in self.commits.values())  # what a reader reads: each shard's newest
        stored = nbytes + sum(size(rec) for stem, rec in self.records.items()  # + what growth left behind
                              if rec is not self.commits.get(shard_of(stem)))
        views = sum(rec["samples"] * rec["views"] for rec in self.commits.values())
        return {"shards_done": len(self.commits), "shards_total": len(self.source_shards), "samples": samples,
                "skipped": skipped, "bytes": nbytes, "bytes_stored": stored,
                "bytes_per_view": nbytes / views if views else 0, "fidelity": meter.report()}


def open_cache(url: str, storage_options: dict | None = None, local_cache: str | None = None,
               local_cache_bytes: int = 100 * 2**30, records: bool = False) -> Cache:
    """Open a cache directory (`<root>/<cache-id>`). Raises CacheError with the URL if it is not one.

    With local_cache (a local directory), shards of a remote cache are downloaded once per machine
    and read locally afterwards (bounded by local_cache_bytes, least recently used evicted, never one
    in use: see `local_copies`). records=True: see `Cache.refresh`."""
    fs, path = url_to_fs(url, storage_options)
    mpath = join(path, MANIFEST)
    if not fs.exists(mpath):
        raise CacheNotFound(f"{url}: no {MANIFEST} here; not a cache directory (use `mdcache ls ROOT` to list caches)")
    manifest = read_json(fs, mpath)
    if manifest.get("format_version") not in READABLE:
        raise CacheError(f"{url}: cache format {manifest.get('format_version')} is not supported "
                         f"(this mdcache reads formats {', '.join(map(str, READABLE))}: a newer mdcache made it)")
    check_manifest(manifest, f"{url.rstrip('/')}/{MANIFEST}")
    if local_cache and not is_local(fs):
        local_copies.check_dir(local_cache)
    return Cache(url=url.rstrip("/"), manifest=manifest, storage_options=storage_options,
                 local_cache=local_cache, local_cache_bytes=local_cache_bytes).refresh(records=records)


def check_manifest(manifest: dict, where: str) -> None:
    """Every byte a decoder depends on is checked before a target is read: the id must be the hash of the
    fingerprint (what produced the targets) and the codec calibration must match its checksum. An edited
    or damaged manifest would otherwise decode every target wrongly and train on it with exit 0."""
    try:
        fp, codec = manifest["fingerprint"], manifest["codec"]
        expected = cache_id(fp)
    except (KeyError, TypeError) as e:
        raise CacheError(f"{where}: not a complete cache manifest (missing {e}); the file is damaged") from None
    if manifest.get("cache_id") != expected:
        raise CacheError(f"{where}: cache id {manifest.get('cache_id')} is not the hash of its fingerprint "
                         f"({expected}): the manifest was edited or damaged; its targets cannot be trusted")
    try:
        named = codec_name(fp)
    except (KeyError, TypeError):
        named = None
    if codec.get("name") != named:
        raise CacheError(f"{where}: codec {codec.get('name')!r} differs from the fingerprint's "
                         f"{named!r}: the manifest was edited or damaged")
    if "calibration_sha256" not in codec:  # written by every mdcache since the checksum exists
        if codec.get("name") not in ("fp16", "int8"):  # int4 and pca never existed without it: removed, not old
            raise CacheError(f"{where}: the {codec.get('name')} codec's calibration checksum is missing: the manifest "
                             "was edited or damaged, and its targets cannot be trusted")
        print(f"warning: {where}: made by an older mdcache: its codec calibration is not covered by a checksum",
              file=sys.stderr)
    elif json_digest(codec.get("calibration")) != codec["calibration_sha256"]:
        raise CacheError(f"{where}: the codec calibration does not match its checksum: the manifest was edited or "
                         "damaged, and every target would decode wrongly. Re-extract the cache (a new cache root, or "
                         "`mdcache rm` this one first)")
    try:
        teacher = manifest["teacher"]
        grid, tokens = teacher["patch_grid"], int(teacher["tokens"])
        expected = codec_record(named, None, tokens, int(teacher["dim"]))["arrays"]
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise CacheError(f"{where}: the teacher's shape is missing or damaged ({e})") from None
    if tokens != int(grid[0]) * int(grid[1]) or codec.get("arrays", expected) != expected:
        raise CacheError(f"{where}: the stored array shapes ({codec.get('arrays')}) do not follow from the codec and "
                         f"the teacher's {tokens} tokens x {teacher['dim']} channels: the manifest was edited or "
                         "damaged")


def list_caches(root: str, storage_options: dict | None = None, records: bool = False) -> list[Cache]:
    """Every cache under a root; a damaged one is skipped with a warning naming it (it must not hide the
    others). A root that is itself a cache directory is that one cache."""
    fs, path = url_to_fs(root, storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        raise CacheError(f"{root}: no such cache root")
    if fs.exists(join(path, MANIFEST)):
        return [open_cache(root, storage_options, records=records)]
    from concurrent.futures import ThreadPoolExecutor

    def one(p: str) -> Cache | None:
        try:
            return open_cache(join(root.rstrip("/"), p.rstrip("/").rsplit("/", 1)[-1]), storage_options,
                              records=records)
        except CacheNotFound:  # not a cache directory
            return None
        except CacheError as e:  # one damaged cache must not hide the others
            print(f"warning: skipped: {e}", file=sys.stderr)
            return None

    dirs = sorted(p for p in fs.ls(path, detail=False) if fs.isdir(p) or not is_local(fs))
    with ThreadPoolExecutor(max_workers=8) as pool:  # a bucket's latency overlaps across caches
        return [c for c in pool.map(one, dirs) if c is not None]
