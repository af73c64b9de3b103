"""The `mdtrain` command. Each subcommand's configuration is one dataclass (see mdcache.config)."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MaskDistill student training from cached teacher targets: pretrain, finetune, eval.")


@app.callback()
def main() -> None:
    """MaskDistill student training from cached teacher targets."""
