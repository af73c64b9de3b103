"""The `mdcache` command: extract, info, ls, verify, show, transcode, plan, bench, gc, rm."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.table import Column, Table

from . import bench, cleanup, extract, plan, show, store, transcode, verify
from .commands import opt, storage_options_opt, typer_command
from .plan import human_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
                  help="Offline teacher-feature cache for MaskDistill: extract once, train many times, share.")
console = Console()


def fidelity_text(f: dict) -> str:
    return f"cos {f['mean_cosine']:.5f} (worst {f['min_cosine']:.5f})" if f else "-"


@dataclass
class InfoConfig:
    """Show one cache: fingerprint, shapes, codec, bytes per view, fidelity, completeness."""

    cache: str = opt(None, "Cache directory (<root>/<cache-id>), local path or fsspec URL.")
    json_out: bool = opt(False, "Print the manifest and statistics as JSON.", param="--json")
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).")


def info(cfg: InfoConfig) -> None:
    cache = store.open_cache(cfg.cache, cfg.storage_options)
    _ = cache.calibration  # its arrays (pca's basis) read and checked: a missing or edited one is an error here too
    stats = cache.stats()
    if cfg.json_out:
        print(json.dumps({"manifest": cache.manifest, "stats": stats}, indent=1))
        return
    m, fp = cache.manifest, cache.manifest["fingerprint"]
    t = Table(show_header=False, box=None)
    t.add_row("cache", cache.url)
    t.add_row("id", m["cache_id"])
    t.add_row("teacher", f"{m['teacher']['spec']} ({fp['teacher']['arch']}, weights {fp['teacher']['weights']}, "
                         f"sha256 {fp['teacher']['weights_sha256'][:12]}, tap {fp['teacher']['tap']}, "
                         f"{fp['teacher']['precision']})")
    grid = "x".join(map(str, m["teacher"]["patch_grid"]))
    t.add_row("targets", f"{cache.views_text()} views x {m['teacher']['tokens']} tokens ({grid}) "
                         f"x {m['teacher']['dim']} dims, codec {m['codec']['name']}")
    calib = m["codec"].get("calibration") or {}
    if "explained_variance_curve" in calib:  # pca: how much of the normalized features R components keep
        curve = ", ".join(f"{r}: {ev:.4f}" for r, ev in calib["explained_variance_curve"].items())
        t.add_row("pca", f"explained variance {calib['explained_variance']:.4f} at R={len(calib['component_std'])} "
                         f"(by R: {curve})")
    if m.get("transcoded_from"):
        t.add_row("from", f"transcoded from {m['transcoded_from']['codec']} cache {m['transcoded_from']['cache_id']} "
                          "(fidelity below is against it)")
    v = fp["views"]
    t.add_row("views", f"{v['image_size']}px, crop scale {v['scale']}, ratio {[round(r, 3) for r in v['ratio']]}, "
                       f"flip {v['flip']}, color jitter {v.get('color_jitter', 0)}, seed {v['seed']}, "
                       f"replay {v['replay']}" + (f", JPEGs decoded with {v['decoder']}" if v.get("decoder") else "")
                       + (f"; the views of cache {v['views_of']}" if v.get("views_of") else ""))
    t.add_row("source", f"{m['source']['spec']} ({fp['source']['shards']} {fp['source']['kind']} shards)")
    t.add_row("complete", f"{stats['shards_done']}/{stats['shards_total']} shards, {stats['samples']} images, "
                          f"{stats['skipped']} skipped")
    superseded = stats["bytes_stored"] - stats["bytes"]
    t.add_row("size", f"{human_bytes(stats['bytes'])}, {human_bytes(stats['bytes_per_view'])} per view"
                      + (f"; {human_bytes(superseded)} more in records superseded by growth (`mdcache gc --superseded "
                         "--yes` removes them)" if superseded else ""))
    t.add_row("fidelity", fidelity_text(stats["fidelity"]) + (f", rel-L2 {stats['fidelity']['mean_rel_l2']:.5f} "
                          f"(worst {stats['fidelity']['max_rel_l2']:.5f}) on {stats['fidelity']['tokens']} tokens"
                          if stats["fidelity"] else ""))
    t.add_row("created", f"{m['created_by']} at {m['created_at']}")
    whole_lines().print(t)


def whole_lines() -> Console:
    """The console for tables: a terminal's width, or in a pipe or log file whole rows (no wrap at 80)."""
    return console if console.is_terminal or "COLUMNS" in os.environ else Console(width=240)


@dataclass
class LsConfig:
    """List the caches under a root, one row each."""

    root: str = opt(None, "Cache root, local path or fsspec URL.")
    storage_options: dict = storage_options_opt("fsspec storage option KEY=VALUE (repeatable).")


def ls(cfg: LsConfig) -> None:
    caches = store.list_caches(cfg.root, cfg.storage_options)
    out = whole_lines()
    wide = out.width >= 160  # at 80 columns, the columns that tell caches apart (info shows the rest)
    names = ["teacher", "tap", "source", "views", "codec", "images", "shards", "bytes", "bytes/view", "fidelity",
             "created"] if wide else ["teacher", "views", "codec", "images", "bytes"]
    groups: dict[str, list[str]] = {}
    t = Table(Column("id", no_wrap=True, min_width=16),  # ids are pasted into commands: never cut
              *(Column(n, overflow="fold") for n in names))  # a long teacher path folds, never ends in "..."
    for c in caches:
        s, m = c.stats(), c.manifest
        random = " (random)" if m["fingerprint"]["teacher"]["weights"] == "random-init" else ""
        row = {"teacher": m["teacher"]["spec"] + random, "tap": m["fingerprint"]["teacher"]["tap"],
               "source": m["source"]["spec"], "views": c.views_text(), "codec": m["codec"]["name"],
               "images": str(s["samples"]), "shards": f"{s['shards_done']}/{s['shards_total']}",
               "bytes": human_bytes(s["bytes"]), "bytes/view": human_bytes(s["bytes_per_view"]),
               "fidelity": fidelity_text(s["fidelity"]), "created": f"{m['created_by']} {m['created_at']}"}
        t.add_row(m["cache_id"], *(row[n] for n in names))
        groups.setdefault(store.views_root(m), []).append(m["cache_id"])
    out.print(t if caches else f"no caches under {cfg.root}")
    for base, ids in groups.items():  # caches whose targets line up key by key and view by view
        if len(ids) > 1:
            out.print(f"same views: {', '.join(sorted(ids, key=lambda i: i != base))}")


typer_command(app, extract.ExtractConfig, extract.run_cli, "extract")
typer_command(app, InfoConfig, info, "info", arguments=("cache",))
typer_command(app, LsConfig, ls, "ls", arguments=("root",))
typer_command(app, verify.VerifyConfig, verify.run_cli, "verify", arguments=("cache",))
typer_command(app, show.ShowConfig, show.run_cli, "show", arguments=("cache",))
typer_command(app, transcode.TranscodeConfig, transcode.run_cli, "transcode", arguments=("src",))
typer_command(app, plan.PlanConfig, plan.run_cli, "plan")
typer_command(app, bench.BenchConfig, bench.run_cli, "bench")
typer_command(app, cleanup.GcConfig, cleanup.run_gc, "gc", arguments=("root",))
typer_command(app, cleanup.RmConfig, cleanup.run_rm, "rm", arguments=("cache",))
