"""`mdcache gc` and `mdcache rm`: remove what no reader trusts, and caches or shards on purpose.

gc removes attempt directories no commit record names (crashed or losing writers), expired claims,
and temp files; with --superseded, also what a grown shard's newer record replaced. It never touches
data a reader of the cache reads, and leaves an uncommitted attempt alone while its
shard has a live claim or while it is younger than the grace period. Both commands are dry runs
unless given --yes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console

from . import fs as mfs
from . import store
from .claims import owner_is_dead, records
from .commands import opt, storage_options_opt
from .errors import CacheError

console = Console()


@dataclass
class GcConfig:
    """Remove uncommitted leftovers and expired claims under a cache root (or one cache). Dry run unless --yes."""

    root: str = opt(None, "Cache root or one cache directory, local path or fsspec URL.")
    grace: float = opt(3600.0, "Leave uncommitted attempts younger than this many seconds (a live writer may own "
                               "them).", ge=0)
    yes: bool = opt(False, "Really delete (default: only list what would be deleted).")
    superseded: bool = opt(False, "Also remove the records (and data) a grown shard left behind: <shard>@4 once "
                                  "<shard>@8 is older than --superseded-after.")
    superseded_after: float = opt(7 * 86400.0, "With --superseded: seconds a newer record must have existed. A "
                                               "trainer that opened the cache before the growth reads the old one "
                                               "until its next read fails, then switches to the newer.", ge=0)
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).")


@dataclass
class RmConfig:
    """Remove a whole cache, or some of its shards (commit record first, so readers stop trusting it).
    Dry run unless --yes."""

    cache: str = opt(None, "Cache directory (<root>/<cache-id>), local path or fsspec URL.")
    shard: list[str] = opt([], "Remove only this shard (repeatable); it is recomputed by the next extract.")
    yes: bool = opt(False, "Really delete (default: only list what would be deleted).")
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).")


def _files(fs, path: str) -> list[dict]:
    """Objects under path (some stores keep empty directory entries after deletes: not garbage)."""
    return [i for i in fs.find(path, detail=True).values() if i.get("type") != "directory"]


def _mtime(fs, path: str) -> float:
    """Newest modification time under path (files in object stores have no directory mtimes)."""
    newest = 0.0
    for info in _files(fs, path):
        t = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        newest = max(newest, t.timestamp() if hasattr(t, "timestamp") else float(t))
    return newest


def superseded(cache: store.Cache, after: float) -> list[tuple[str, str]]:
    """The records a grown shard left behind and the data only they name, records first (from then on no reader
    trusts the data), once the newer record has existed for `after` seconds (by the store's clock) and its data
    is there: a shard whose newest attempt was lost keeps its older record, the copy extract resumes from."""
    fs, path = mfs.url_to_fs(cache.url, cache.storage_options)
    now, old = time.time(), []
    for stem, rec in sorted(cache.records.items()):
        newest = cache.commits.get(rec["shard"])
        if newest is None or rec is newest or rec["views"] >= newest["views"]:
            continue
        if now - _mtime(fs, store.record_file(path, store.record_stem(newest))) > after \
                and fs.exists(mfs.join(path, newest["path"])):
            old.append((stem, rec, newest))
    kept = {rec["path"] for rec in cache.commits.values()}
    return [*((store.record_file(path, stem), f"record superseded by {new['shard']}@{new['views']}")
              for stem, _, new in old),
            *((mfs.join(path, rec["path"]), f"data of the superseded record {stem}")
              for stem, rec, _ in old if rec["path"] not in kept)]


def garbage(cache: store.Cache, grace: float) -> list[tuple[str, str]]:
    """(path, reason) for everything in one cache that gc may remove."""
    fs, path = mfs.url_to_fs(cache.url, cache.storage_options)
    fs.invalidate_cache(path)
    now = time.time()
    out, live_claims = [], set()
    cdir, damaged = mfs.join(path, store.CLAIMS), []
    for p in fs.ls(cdir, detail=False) if fs.exists(cdir) else []:
        if p.rsplit("/", 1)[-1].startswith(".write-probe-") and now - _mtime(fs, p) > grace:
            out.append((p, "stale write probe"))
    for p, rec in records(fs, cdir, damaged):
        if rec.get("expires", 0) < now or owner_is_dead(rec.get("owner", "")):  # (a committed shard may be growing)
            out.append((p, f"expired claim of {rec.get('owner')}"))
        else:
            live_claims.add(rec.get("shard"))
    out += [(p, "damaged claim") for p in damaged]
    referenced = {rec["path"].rsplit("/", 1)[-1] for rec in cache.records.values()}  # every K a shard grew through
    sdir = mfs.join(path, store.SHARDS)
    for p in fs.ls(sdir, detail=False) if fs.exists(sdir) else []:
        attempt = p.rstrip("/").rsplit("/", 1)[-1]
        shard = attempt.rsplit(".", 1)[0]
        if attempt in referenced or shard in live_claims or not _files(fs, p):
            continue
        if now - _mtime(fs, p) > grace:
            out.append((p, "uncommitted attempt" + (" (shard committed elsewhere)" if shard in cache.commits else "")))
    kept = {ref["array"].rsplit("/", 1)[-1]
            for ref in store.calibration_arrays(cache.manifest["codec"].get("calibration")).values()}
    cal = mfs.join(path, store.CALIBRATION)
    for p in fs.ls(cal, detail=False) if fs.exists(cal) else []:  # a creator that lost the manifest race
        if p.rstrip("/").rsplit("/", 1)[-1] not in kept and now - _mtime(fs, p) > grace:
            out.append((p, "calibration array of a manifest that lost the race"))
    for d in (path, mfs.join(path, store.COMMITS)):
        for p in fs.ls(d, detail=False) if fs.exists(d) else []:
            if ".tmp-" in p.rsplit("/", 1)[-1] and now - _mtime(fs, p) > grace:
                out.append((p, "temp file"))
    return out




def _delete(fs, items: list[tuple[str, str]], yes: bool) -> None:
    for p, why in items:
        console.print(f"{'removing' if yes else 'would remove'} {p}  [dim]({why})[/]")
        if yes:
            try:
                fs.rm(p, recursive=True)
            except PermissionError as e:
                raise CacheError(f"no permission to delete {p} ({e}); deleting needs write credentials") from None
    if not items:
        console.print("nothing to remove")
    elif not yes:
        console.print(f"dry run: {len(items)} item(s); add --yes to delete")


def gc(cfg: GcConfig) -> list[tuple[str, str]]:
    """What no commit record names, decided from the records themselves (never the index alone: a wrong
    index would otherwise send gc after committed data). With --yes a damaged index is rewritten too."""
    so = cfg.storage_options
    caches = store.list_caches(cfg.root, so, records=True)
    old = {c.url: superseded(c, cfg.superseded_after) if cfg.superseded else [] for c in caches}
    items = [it for c in caches for it in [*garbage(c, cfg.grace), *old[c.url]]]
    fs, _ = mfs.url_to_fs(cfg.root, so)
    _delete(fs, items, cfg.yes)
    for c in caches:
        if cfg.yes and old[c.url]:  # the index still names the removed records
            console.print(f"rewriting {c.url}/{store.COMMIT_INDEX}  [dim](records superseded by growth removed)[/]")
            c.refresh(records=True).write_index()
        if c.index_problems:
            console.print(f"{'rewriting' if cfg.yes else 'would rewrite'} {c.url}/{store.COMMIT_INDEX}  "
                          f"[dim](disagrees with the commit records: {c.index_problems[0]})[/]")
            if cfg.yes:
                c.write_index()
    return items


def rm(cfg: RmConfig) -> list[tuple[str, str]]:
    so = cfg.storage_options
    if not cfg.shard:  # the listing alone: a cache whose manifest is damaged can still be removed
        fs, path = mfs.url_to_fs(cfg.cache, so)
        if not fs.exists(mfs.join(path, store.MANIFEST)):
            raise store.CacheNotFound(f"{cfg.cache}: no {store.MANIFEST} here; not a cache directory")
        items = [(p, w) for p, w in [(mfs.join(path, store.COMMITS), "commit records"), (path, "the whole cache")]
                 if fs.exists(p)]
        _delete(fs, items, cfg.yes)
        return items
    cache = store.open_cache(cfg.cache, so, records=True)
    fs, path = mfs.url_to_fs(cache.url, so)
    unknown = [s for s in cfg.shard if s not in cache.commits]
    if unknown:
        raise store.CacheError(f"{cache.url}: shard(s) not committed: {', '.join(unknown)}")
    items = []
    for s in cfg.shard:  # the records first (every K it grew through): from then on no reader trusts the data
        recs = [(stem, r) for stem, r in cache.records.items() if store.shard_of(stem) == s]
        items += [(store.record_file(path, stem), "commit record") for stem, _ in recs]
        items += [(mfs.join(path, r["path"]), "shard data") for _, r in recs]
    _delete(fs, items, cfg.yes)
    return items


def run_gc(cfg: GcConfig) -> None:
    gc(cfg)


def run_rm(cfg: RmConfig) -> None:
    rm(cfg)
