"""One place per command for configuration: a dataclass whose fields become the Typer options.

Each field carries its help text in `metadata={"help": ...}`; `typer_command` turns the dataclass
into a command whose `--help` shows every default, so the CLI, the Python API and docs/ cannot drift.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable

import typer


def opt(default: Any, help: str, *, param: str | None = None) -> Any:
    """A config field: default + help (+ optional explicit --flag name)."""
    meta = {"help": help}
    if param:
        meta["param"] = param
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def typer_command(app: typer.Typer, cfg_cls: type, run: Callable[[Any], Any], name: str,
                  help: str | None = None, arguments: tuple[str, ...] = ()) -> None:
    """Register `run(cfg_cls(**options))` as `name`; fields listed in `arguments` are positional."""
    hints = typing.get_type_hints(cfg_cls)
    params, annotations = [], {}
    for f in dataclasses.fields(cfg_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        decls = [f.metadata["param"]] if "param" in f.metadata else []
        if f.name in arguments:
            info = typer.Argument(... if default is None else default, help=f.metadata.get("help", ""),
                                  show_default=default is not None)
        else:
            info = typer.Option(default, *decls, help=f.metadata.get("help", ""), show_default=True)
        annotations[f.name] = hints[f.name]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hints[f.name]))

    def command(**kwargs):
        return run(cfg_cls(**kwargs))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__name__ = name.replace("-", "_")
    command.__doc__ = help or (cfg_cls.__doc__ or "")
    app.command(name)(command)


def parse_floats(text: str, n: int, what: str) -> tuple[float, ...]:
    """'0.2,1.0' -> (0.2, 1.0), with an error that names the option."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{what}: expected {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise typer.BadParameter(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return vals
