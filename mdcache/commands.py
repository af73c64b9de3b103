"""One place per command for configuration, and the one error boundary of both CLIs.

A command's configuration is a dataclass whose fields carry their help text (`opt`);
`typer_command` turns it into a Typer command whose `--help` shows every default, so the CLI, the
Python API and docs/ cannot drift. Values that the shell spells differently from the API are
converted here, at the edge, once: `--storage-option KEY=VALUE` (repeatable) becomes the
`storage_options` dict every function takes; ranges are real tuples (`--crop-scale 0.2 1.0`).

Errors: a `UserError` prints one red line and exits with its code (2); anything else is a bug and
keeps its traceback. A torch.distributed process group is torn down either way.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import ConfigError, UserError, storage_error
from .fs import parse_storage_options

STORAGE_HELP = "fsspec storage option KEY=VALUE for remote URLs (repeatable), e.g. endpoint_url=http://host:8333."


def opt(default: Any, help: str, *, param: str | None = None, cli: tuple[Any, Callable] | None = None,
        required: bool = False, shown: str | None = None, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, old: tuple[str, ...] = (), group: str | None = None,
        hidden: bool = False) -> Any:
    """A config field: default + help (+ an explicit --flag name, + a (CLI type, parser) pair when the
    shell spelling differs from the API value; required: the command line must give it; shown: how
    --help writes the default, e.g. '75/196' rather than 0.3826530612244898). A numeric field says its
    bounds (ge/gt/le/lt; for a pair, of each value), checked by `check_options` at the edge. `old`:
    spellings of earlier releases, still accepted with a one-line deprecation warning (CHANGELOG.md);
    `group`: the panel --help lists the option in."""
    meta: dict[str, Any] = {"help": help, "required": required, "shown": shown, "old": tuple(old), "group": group,
                            "hidden": hidden}
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["bounds"] = bounds
    if param:
        meta["param"] = param
    if cli:
        meta["cli"] = cli
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def precision_opt(what: str = "Autocast", group: str | None = None) -> Any:
    """The `precision` field of every command that runs a model."""
    return opt("auto", f"{what}: auto (bf16 on GPUs with native bf16, fp16 on older GPUs with a loss scaler when "
                       "training, fp32 on CPUs), fp32, bf16, fp16.", group=group)


def storage_options_opt(help: str = STORAGE_HELP, group: str | None = None) -> Any:
    """The `storage_options` field every command that reads URLs has: a dict in Python, repeatable
    `--storage-option KEY=VALUE` on the command line."""
    return opt({}, help, param="--storage-option", cli=(list[str], parse_storage_options), group=group)


BOUND_TEXT = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}
BOUND_OK = {"ge": lambda x, b: x >= b, "gt": lambda x, b: x > b, "le": lambda x, b: x <= b, "lt": lambda x, b: x < b}


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("param") or "--" + f.name.replace("_", "-")


def bounds_text(f: dataclasses.Field) -> str:
    """' (>= 1)': a field's bounds as --help shows them."""
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{ops[k]} {v:g}" for k, v in f.metadata.get("bounds", {}).items()]
    return f" ({', '.join(parts)})" if parts else ""


def check_options(cfg: Any) -> None:
    """Every numeric option finite and within its field's bounds, and every MIN MAX pair ordered: one named
    line here, never a hang, a negative size or 'nan PB/s' later (a negative batch size once made
    `transcode` wait forever on its own claims)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = list(value) if isinstance(value, (tuple, list)) else [value]
        numbers = [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]
        shown = " ".join(map(str, values))
        for x in numbers:
            if not math.isfinite(x):
                raise ConfigError(f"{flag_name(f)} {shown}: must be a finite number")
            for kind, bound in f.metadata.get("bounds", {}).items():
                if not BOUND_OK[kind](x, bound):
                    raise ConfigError(f"{flag_name(f)} {shown}: must be {BOUND_TEXT[kind]} {bound:g}")
        if len(numbers) == 2 == len(values) and isinstance(value, tuple) and numbers[0] > numbers[1]:
            raise ConfigError(f"{flag_name(f)} {shown}: give MIN MAX (MIN <= MAX)")


def parse_model_args(items: list[str]) -> dict:
    """['depth=4', 'embed_dim=128', 'qkv_bias=false'] -> {'depth': 4, 'embed_dim': 128, 'qkv_bias': False}:
    timm model arguments (JSON values where they parse, strings otherwise)."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"model argument {item!r}: expected KEY=VALUE (e.g. depth=4)")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def model_args_opt(flag: str, what: str, group: str | None = None) -> Any:
    """A `dict` of timm model arguments, spelled `--FLAG KEY=VALUE` (repeatable) on the command line, so
    small custom ViTs work everywhere (e.g. img_size=28 patch_size=4 embed_dim=128 depth=4 num_heads=4)."""
    return opt({}, f"timm model argument KEY=VALUE for the {what} (repeatable), e.g. depth=4 embed_dim=128.",
               param=flag, cli=(list[str], parse_model_args), group=group)


def print_error(e: BaseException) -> None:
    """One red 'error:' line on stderr, never re-wrapped (paths in messages stay copyable)."""
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(e))}", highlight=False)


def run_command(fn: Callable[[Any], Any], cfg: Any) -> Any:
    """The error boundary: UserError -> one line + its exit code; the process group is torn down."""
    try:
        return fn(cfg)
    except UserError as e:
        print_error(e)
        raise SystemExit(e.exit_code) from None
    except Exception as e:
        fields = dict(cfg) if isinstance(cfg, dict) else (
            {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else {})
        ranked = sorted(fields, key=lambda k: k not in ("cache", "root", "out"))  # where a job writes, first
        values = ((v,) if isinstance(v, str) else v if isinstance(v, (list, tuple)) else () for k in ranked
                  for v in (fields[k],))  # repeatable options (pretrain's --cache) hold lists of URLs
        url = next((u for vs in values for u in vs if isinstance(u, str) and "://" in u), None)
        known = storage_error(e, url)
        if known is None:
            raise
        print_error(known)
        raise SystemExit(known.exit_code) from None
    finally:
        import sys

        if "torch" in sys.modules:  # never import torch just to check
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


CONFIGS: dict[str, type] = {}  # "mdcache extract" -> its configuration dataclass (what the tests and docs walk)


def typer_command(app: typer.Typer, cfg_cls: type, run: Callable[[Any], Any], name: str,
                  help: str | None = None, arguments: tuple[str, ...] = ()) -> None:
    """Register `run(cfg_cls(**options))` as `name`, inside the error boundary; fields listed in
    `arguments` are positional."""
    hints = typing.get_type_hints(cfg_cls)
    CONFIGS[f"{cfg_cls.__module__.split('.')[0]} {name}"] = cfg_cls
    params, annotations, parsers, renamed = [], {}, {}, {}
    for f in dataclasses.fields(cfg_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        decls = [f.metadata["param"]] if "param" in f.metadata else []
        hint = hints[f.name]
        if "cli" in f.metadata:
            hint, parsers[f.name] = f.metadata["cli"]
            default = [] if isinstance(default, dict) else default
        if f.name in arguments:
            info = typer.Argument(... if default is None else default, help=f.metadata.get("help", ""),
                                  show_default=default is not None)
        else:
            info = typer.Option(... if f.metadata.get("required") and not f.metadata.get("old") else default,
                                *decls, help=escape(f.metadata.get("help", "") + bounds_text(f)),
                                show_default=f.metadata.get("shown") or True, hidden=f.metadata.get("hidden", False),
                                rich_help_panel=f.metadata.get("group") or None)
        annotations[f.name] = hint
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hint))
        for i, old in enumerate(f.metadata.get("old", ())):  # an earlier spelling: hidden, warned about, mapped
            key = f"{f.name}__old{i}"
            renamed[key] = (f.name, old, decls[0] if decls else "--" + f.name.replace("_", "-"), default)
            params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[hint],
                                            default=typer.Option(None, old, hidden=True)))
            annotations[key] = Optional[hint]

    def command(**kwargs):
        def build_and_run(kw):
            for key, (field, old, new, default) in renamed.items():
                value = kw.pop(key)
                if value is not None:
                    Console(stderr=True, soft_wrap=True).print(
                        f"[yellow]warning:[/] {old} is now {new} (the old spelling works for this release)",
                        highlight=False)
                    if kw[field] in (default, None, ...):
                        kw[field] = value
            missing = [f for f in dataclasses.fields(cfg_cls) if f.metadata.get("required") and kw.get(f.name) in
                       (None, "", ...)]
            if missing:
                raise ConfigError(f"missing option {flag_name(missing[0])}")
            cfg = cfg_cls(**{k: parsers[k](v) if k in parsers else v for k, v in kw.items()})
            check_options(cfg)
            return run(cfg)

        return run_command(build_and_run, kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__name__ = name.replace("-", "_")
    command.__doc__ = help or (cfg_cls.__doc__ or "")
    app.command(name)(command)


@dataclasses.dataclass
class ViewOptions:
    """The view recipe's options, shared by `mdcache extract` and `mdtrain pretrain`'s online mode."""

    views: int = opt(2, "Views (augmented crops) per image.", ge=1, group="Views")
    image_size: Optional[int] = opt(None, "Teacher (and student) input size in pixels; None = the size the teacher's "
                                          "weights record (`mdtrain finetune` writes it), else 224.", ge=1,
                                    group="Views")
    crop_scale: tuple[float, float] = opt((0.2, 1.0), "RandomResizedCrop area scale range: MIN MAX.",
                                          gt=0, le=1, group="Views")
    crop_ratio: tuple[float, float] = opt((0.75, 1.3333333333), "RandomResizedCrop aspect ratio range: MIN MAX.",
                                          shown="3/4 4/3", gt=0, group="Views")
    flip: bool = opt(True, "Random horizontal flip (p=0.5), recorded per view.", group="Views")
    color_jitter: float = opt(0.4, "ColorJitter strength for brightness, contrast and saturation, recorded per view "
                                   "and replayed (BEiT v2 and MaskDistill re-implementations: 0.4; 0: off).",
                              ge=0, group="Views")
    replay: str = opt("tensor-bicubic-aa-v1", "How stored view parameters become pixels (recorded in the cache; "
                                              "readers always use the cache's): tensor-bicubic-aa-v1 (uint8 torch "
                                              "ops, 3x faster, runs on a GPU too) or pil-rgb-crop-bicubic-flip-"
                                              "enhance-v1 (PIL, the replay of caches made before).", group="Views")

    replay_on: str = opt("workers", "Where views are made: workers (the loader processes decode and replay), device "
                                    "(workers decode; the model's device crops, resizes and jitters) or device-decode "
                                    "(workers only read the files; the device decodes JPEGs too: nvJPEG on a GPU, on "
                                    "a CPU the same pixels as PIL). The tensor replay only; a GPU when CPU cores are "
                                    "short.", group="Views")

    def view_recipe(self, image_size: int, seed: int):
        from .views import ViewRecipe, check_replay, check_replay_on

        check_replay_on(self.replay_on, self.replay)
        return ViewRecipe(image_size=image_size, scale=tuple(self.crop_scale), ratio=tuple(self.crop_ratio),
                          flip=self.flip, views=self.views, seed=seed, color_jitter=self.color_jitter,
                          replay=check_replay(self.replay))


def public_config(cfg: Any) -> dict:
    """A config as a dict safe to write next to outputs (config.json, checkpoints, buckets): storage option
    values (keys, secrets, tokens) are replaced by '***'."""
    d = dataclasses.asdict(cfg)
    if d.get("storage_options"):
        d["storage_options"] = {k: "***" for k in d["storage_options"]}
    return d
