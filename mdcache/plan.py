"""`mdcache plan`: what a cache will cost before anything runs. Pure arithmetic from the codec registry.

Bytes per view = tokens x the codec's bytes per token (codes plus per-token scalars) + the view's
parameters (11 int32). That is before compression: Blosc/Zstd takes 0-10% off these arrays (int8 and int4
codes look random to it; fp16 compresses a little), so the figures are a slight upper bound. A
training run reads one view per image per epoch, so the read bandwidth is bytes per view x images/s.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from rich.console import Console
from rich.table import Table

from . import codecs, views
from .commands import check_options, opt
from .errors import ConfigError
from .teachers import NAMED

console = Console(soft_wrap=True)  # whole lines in logs and narrow terminals

# tokens and channels of the tap `final` (the default) of the named teachers (the teacher registry's); others:
# --tokens/--dim
TEACHER_SHAPES = {name: (t.tokens, t.dim) for name, t in NAMED.items()}
VIEW_BYTES = 4 * len(views.VIEW_FIELDS)
TABLE_VIEWS = (1, 2, 4, 8, 16)


@dataclass
class PlanConfig:
    """Cache size, read bandwidth and extraction time for a dataset, K and codec, before running anything."""

    images: int = opt(1281167, "Images in the source (default: ImageNet-1k train).", ge=1)
    views: int = opt(8, "Stored views per image (K).", ge=1)
    codec: str = opt("int8", "Codec: fp16, int8, int4 or pca:R.")
    teacher: str = opt("clip-b16", f"Teacher whose shape to use: {', '.join(TEACHER_SHAPES)} (or give --tokens and "
                                   "--dim).")
    tokens: Optional[int] = opt(None, "Patch tokens per view (overrides the teacher's).", ge=1)
    dim: Optional[int] = opt(None, "Channels per token (overrides the teacher's).", ge=1)
    train_ips: float = opt(3000.0, "Training images/s the cache must feed (a read bandwidth follows).", gt=0)
    bench: Optional[str] = opt(None, "A `mdcache bench --json-out` result: extraction time at its images/s.")
    add_teacher: Optional[str] = opt(None, "Also price a second teacher's cache on the same views (`mdcache extract "
                                           f"--views-of`, same K and codec): {', '.join(TEACHER_SHAPES)}, or its "
                                           "shape as TOKENSxDIM (e.g. 49x512); training from both reads both.")
    json_out: bool = opt(False, "Print the plan as JSON.", param="--json")


def shape(cfg: PlanConfig) -> tuple[int, int]:
    tokens, dim = TEACHER_SHAPES.get(cfg.teacher, (None, None))
    tokens, dim = cfg.tokens or tokens, cfg.dim or dim
    if not tokens or not dim:
        raise ConfigError(f"plan: no known shape for teacher {cfg.teacher!r}; give --tokens and --dim "
                          f"(known: {', '.join(TEACHER_SHAPES)})")
    return tokens, dim


def second_shape(spec: str) -> tuple[int, int]:
    """--add-teacher: a named teacher's shape, or TOKENSxDIM."""
    if spec in TEACHER_SHAPES:
        return TEACHER_SHAPES[spec]
    try:
        tokens, dim = (int(x) for x in spec.lower().split("x"))
        if tokens >= 1 and dim >= 1:
            return tokens, dim
    except ValueError:
        pass
    raise ConfigError(f"--add-teacher {spec!r}: a named teacher ({', '.join(TEACHER_SHAPES)}) or TOKENSxDIM, e.g. "
                      "49x512")


def bytes_per_view(codec: str, tokens: int, dim: int) -> int:
    return tokens * codecs.get_codec(codec).bytes_per_token(dim) + VIEW_BYTES


def read_bench(path: str) -> dict:
    """A `mdcache bench --json-out` file, or one line saying why it is not one."""
    try:
        with open(path) as f:
            b = json.load(f)
    except OSError as e:
        raise ConfigError(f"--bench {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"--bench {path}: not JSON ({e})") from None
    ips = b.get("extract_ips") if isinstance(b, dict) else None
    if not isinstance(b, dict) or ("extract_ips" in b and not (isinstance(ips, (int, float)) and ips > 0)):
        raise ConfigError(f"--bench {path}: not a `mdcache bench --json-out` result (expected an object with "
                          "extract_ips > 0)")
    return b


def plan(cfg: PlanConfig) -> dict:
    check_options(cfg)
    tokens, dim = shape(cfg)
    per_view = bytes_per_view(cfg.codec, tokens, dim)
    out = {"images": cfg.images, "views": cfg.views, "codec": cfg.codec, "tokens": tokens, "dim": dim,
           "bytes_per_view": per_view, "ratio_to_fp16": per_view / bytes_per_view("fp16", tokens, dim),
           "cache_bytes": per_view * cfg.views * cfg.images, "train_ips": cfg.train_ips,
           "read_bytes_per_s": per_view * cfg.train_ips}
    if cfg.bench:
        b = read_bench(cfg.bench)
        if b.get("no_teacher") or "extract_ips" not in b:
            raise ConfigError(f"{cfg.bench}: a `mdcache bench --no-teacher` result measures the CPU side alone; "
                              "give a bench result with the teacher for an extraction time")
        ips = b["extract_ips"]
        # the teacher's work grows with K: scale the measured rate from the bench's K to this one
        out["extract_ips"] = ips * b["views"] / cfg.views
        out["extract_seconds"] = cfg.images / out["extract_ips"]
        out["bench"] = {k: b.get(k) for k in ("teacher", "codec", "views", "device", "precision")}
    if cfg.add_teacher:
        t2, d2 = second_shape(cfg.add_teacher)
        per_view2 = bytes_per_view(cfg.codec, t2, d2)  # its cache stores the view parameters too
        out["second_teacher"] = {"teacher": cfg.add_teacher, "tokens": t2, "dim": d2, "bytes_per_view": per_view2,
                                 "cache_bytes": per_view2 * cfg.views * cfg.images,
                                 "total_bytes": (per_view + per_view2) * cfg.views * cfg.images,
                                 "read_bytes_per_s": (per_view + per_view2) * cfg.train_ips}
    out["table"] = {c: {k: bytes_per_view(c, tokens, dim) * k * cfg.images for k in TABLE_VIEWS}
                    for c in table_codecs(cfg.codec, dim)}
    return out


def table_codecs(codec: str, dim: int) -> list[str]:
    names = ["fp16", "int8", *(["int4"] if dim % 2 == 0 else []), *(f"pca:{r}" for r in (dim // 4, dim // 8) if r)]
    return names if codec in names else [*names, codec]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def run_cli(cfg: PlanConfig) -> None:
    r = plan(cfg)
    if cfg.json_out:
        print(json.dumps(r, indent=1))
        return
    console.print(f"{r['images']:,} images x {r['views']} views, {cfg.codec}, {r['tokens']} tokens x {r['dim']} dims:")
    console.print(f"  per view    {human_bytes(r['bytes_per_view'])} ({r['ratio_to_fp16']:.3f}x fp16), "
                  "before compression")
    console.print(f"  cache       {human_bytes(r['cache_bytes'])}")
    console.print(f"  read rate   {human_bytes(r['read_bytes_per_s'])}/s at {cfg.train_ips:g} training images/s")
    if "extract_seconds" in r:
        b = r["bench"]
        console.print(f"  extraction  {duration(r['extract_seconds'])} at {r['extract_ips']:.1f} images/s "
                      f"(measured: {b['teacher']} on {b['device']}, {b['precision']}, K={b['views']})")
    if "second_teacher" in r:
        t2 = r["second_teacher"]
        console.print(f"  + teacher   {t2['teacher']} on the same views ({t2['tokens']} tokens x {t2['dim']} dims): "
                      f"{human_bytes(t2['cache_bytes'])} more, {human_bytes(t2['total_bytes'])} for both; training "
                      f"from both reads {human_bytes(t2['read_bytes_per_s'])}/s")
    t = Table("codec", *[f"K={k}" for k in TABLE_VIEWS], title="cache size by codec and K", title_justify="left")
    for c, row in r["table"].items():
        t.add_row(c, *[human_bytes(v) for v in row.values()])
    console.print(t)
