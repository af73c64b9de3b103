"""Render docs/cli.md from the Typer apps themselves, so the reference cannot drift from --help.

    python scripts/gen_cli_docs.py > docs/cli.md      (tests/test_docs.py checks it is current)
"""
from __future__ import annotations

import typer


def render() -> str:
    from mdcache.cli import app as mdcache_app
    from mdtrain.cli import app as mdtrain_app

    out = ["# Command reference", "",
           "Generated from the commands' own definitions by `scripts/gen_cli_docs.py`; every option's default",
           "is the one `--help` shows. Each command's options mirror one configuration dataclass.", ""]
    for prog, app in (("mdcache", mdcache_app), ("mdtrain", mdtrain_app)):
        group = typer.main.get_command(app)
        out += [f"## {prog}", "", (group.help or "").strip(), ""]
        for name in sorted(group.commands):
            cmd = group.commands[name]
            out += [f"### `{prog} {name}`", "", (cmd.help or "").strip().split("\n\n")[0], "",
                    "| option | default | meaning |", "| --- | --- | --- |"]
            for p in cmd.params:
                if getattr(p, "hidden", False):  # an old spelling (CHANGELOG.md), kept working for a release
                    continue
                if p.param_type_name == "argument":  # typer vendors click: duck-type
                    flag = f"`{p.name.upper()}` (argument)"
                else:
                    flag = " / ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
                default = p.default
                if getattr(p, "required", False):
                    default = "(required)"
                elif isinstance(getattr(p, "show_default", None), str):  # how --help writes it, e.g. 75/196
                    default = p.show_default
                elif isinstance(default, (list, tuple)):
                    default = ",".join(map(str, default)) if default else "(none)"
                elif default is None or default == "":
                    default = "(none)"
                elif getattr(p, "is_flag", False) and p.secondary_opts:
                    default = p.opts[0] if p.default else p.secondary_opts[0]
                help_text = (getattr(p, "help", "") or "").replace("|", "\\|")
                out.append(f"| {flag} | `{default}` | {help_text} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
