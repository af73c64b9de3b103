"""The `mdtrain` command. Each subcommand's configuration is one dataclass (see mdcache.config)."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MaskDistill student training from cached teacher targets: pretrain, finetune, eval.")


@app.callback()
def main() -> None:
    """MaskDistill student training from cached teacher targets."""


from mdcache.config import typer_command  # noqa: E402

from . import pretrain as _pretrain  # noqa: E402

typer_command(app, _pretrain.PretrainConfig, _pretrain.run_cli, "pretrain")

from . import evaluate as _evaluate, ffcv_loader as _ffcv, finetune as _finetune  # noqa: E402

typer_command(app, _finetune.FinetuneConfig, _finetune.run_cli, "finetune")
typer_command(app, _evaluate.EvalConfig, _evaluate.run_eval_cli, "eval")
typer_command(app, _evaluate.KnnConfig, _evaluate.run_knn_cli, "knn")
typer_command(app, _ffcv.FfcvBuildConfig, _ffcv.run_build_cli, "ffcv-build")
typer_command(app, _ffcv.BenchLoaderConfig, _ffcv.run_bench_cli, "bench-loader")

from . import bench as _bench  # noqa: E402

typer_command(app, _bench.BenchConfig, _bench.run_cli, "bench")
