"""The `mdtrain` command. Each subcommand's configuration is one dataclass (see mdcache.commands)."""
from __future__ import annotations

import typer

from mdcache.commands import typer_command

from . import bench, bench_storage, distill_loss, evaluate, ffcv_loader, finetune, pretrain

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
                  help="MaskDistill student training from cached teacher targets: pretrain, finetune, eval.")


@app.callback()
def main() -> None:
    """MaskDistill student training from cached teacher targets."""


typer_command(app, pretrain.PretrainConfig, pretrain.run_cli, "pretrain")
typer_command(app, finetune.FinetuneConfig, finetune.run_cli, "finetune")
typer_command(app, evaluate.EvalConfig, evaluate.run_eval_cli, "eval")
typer_command(app, evaluate.KnnConfig, evaluate.run_knn_cli, "knn")
typer_command(app, evaluate.LinprobeConfig, evaluate.run_linprobe_cli, "linprobe")
typer_command(app, distill_loss.DistillLossConfig, distill_loss.run_cli, "distill-loss")
typer_command(app, ffcv_loader.FfcvBuildConfig, ffcv_loader.run_build_cli, "ffcv-build")
typer_command(app, ffcv_loader.BenchLoaderConfig, ffcv_loader.run_bench_cli, "bench-loader")
typer_command(app, bench.BenchConfig, bench.run_cli, "bench")
typer_command(app, bench_storage.StorageBenchConfig, bench_storage.run_cli, "bench-storage")
