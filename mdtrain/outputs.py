"""A run's output directory: `--out` as a local path or any fsspec URL, its metrics log and plots.

A remote --out is mirrored in a local working directory: existing remote files are pulled first (so
`--resume auto` finds last.ckpt), the trainer writes locally as usual, and `push()` uploads what
changed after every checkpoint. Each file is uploaded whole (one PUT), so a reader of the bucket
sees either the previous or the new version of a checkpoint, never a torn one.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

from mdcache import fs as mfs
from mdcache.errors import ConfigError, UserError


class OutputError(UserError):
    """The run's output folder cannot be written (read-only, full, a file in the way). Names the path."""


def writable_dir(path: str, what: str) -> str:
    """Create `path` if needed and prove it takes a file now, not after an epoch of training."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("x")
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write there ({e.strerror or e})") from None
    return path


class OutputDir:
    def __init__(self, out: str, storage_options: dict | None = None):
        fs, path = mfs.url_to_fs(out, storage_options)
        self.url = out
        self._pushed: dict[str, tuple[int, float]] = {}
        if mfs.is_local(fs):
            self.fs, self.remote, self.local = None, None, writable_dir(path, "--out")
            return
        self.fs, self.remote = fs, path
        self.local = writable_dir(mfs.user_cache_dir("outputs", hashlib.sha256(out.encode()).hexdigest()[:16]),
                                  f"the local mirror of --out {out}:")
        if fs.exists(path):  # the bucket is the truth: refresh the mirror from it
            mfs.download_tree(fs, path, self.local, merge=True)
        for d, _, files in os.walk(self.local):
            for name in files:
                self._pushed[os.path.join(d, name)] = self._stamp(os.path.join(d, name))

    def path(self, name: str) -> str:
        return os.path.join(self.local, name)

    @staticmethod
    def _stamp(p: str) -> tuple[int, float]:
        st = os.stat(p)
        return st.st_size, st.st_mtime

    def push(self) -> list[str]:
        """Upload new or changed files of the local mirror; returns their remote paths."""
        if self.fs is None:
            return []
        sent = []
        for d, _, files in os.walk(self.local):
            for name in files:
                p = os.path.join(d, name)
                if ".tmp" in name or self._pushed.get(p) == self._stamp(p):
                    continue
                dst = mfs.join(self.remote, os.path.relpath(p, self.local).replace(os.sep, "/"))
                self.fs.put_file(p, dst)
                self._pushed[p] = self._stamp(p)
                sent.append(dst)
        return sent


TRACKERS = ("tensorboard", "wandb")


def check_trackers(kinds: list[str]) -> None:
    """Fail before training if a tracker is unknown or its package is missing (not after an epoch)."""
    import importlib.util

    for kind in kinds:
        if kind not in TRACKERS:
            raise ConfigError(f"--log {kind!r}: choose from {', '.join(TRACKERS)} (metrics.jsonl is always written)")
        if importlib.util.find_spec(kind) is None:
            raise ConfigError(f"--log {kind} needs the {kind} package: pip install {kind}")


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as training goes. On resume, `truncate`
    keeps exactly the rows the checkpoint covers (a crash after a checkpoint may have logged more).
    With trackers, every numeric value of a row also goes to TensorBoard event files (OUT/tensorboard/)
    and/or a Weights & Biases run (offline unless WANDB_MODE says otherwise), at the row's step."""

    def __init__(self, path: str, trackers: tuple[str, ...] = (), run_name: str = "", config: dict | None = None):
        self.path = path
        self._f = None
        self._sinks = []
        out = os.path.dirname(path)
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            try:
                writer = SummaryWriter(os.path.join(out, "tensorboard"))
            except OSError as e:
                raise OutputError(f"--log tensorboard: cannot write event files to {os.path.join(out, 'tensorboard')}"
                                  f" ({e.strerror or e}; a file where the folder should be?)") from None
            self._sinks.append((lambda k, v, step: writer.add_scalar(k, v, step), writer.close))
        if "wandb" in trackers:
            import wandb

            run = wandb.init(dir=out, name=run_name or None, config=config or {},
                             mode=os.environ.get("WANDB_MODE", "offline"))
            self._sinks.append((lambda k, v, step: run.log({k: v}, step=step), run.finish))

    def rows(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, keep: Callable[[dict], bool]) -> list[dict]:
        """Rewrite the log with the rows `keep` accepts (atomically); returns them."""
        rows = [r for r in self.rows() if keep(r)]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(tmp, self.path)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise OutputError(f"writing {self.path} failed ({e.strerror or e})") from None
        return rows

    def write(self, row: dict) -> None:
        try:
            if self._f is None:
                self._f = open(self.path, "a")
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        except OSError as e:
            raise OutputError(f"writing {self.path} failed ({e.strerror or e})") from None
        step = int(row.get("step", row.get("epoch", 0)))  # finetune logs per epoch
        for add, _ in self._sinks:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    add(k, v, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        for _, close in self._sinks:
            close()
        self._sinks = []


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png_path: str) -> None:
    """A plot is a convenience: a full disk here is a warning, not a failed run (the metrics are saved)."""
    import sys

    try:
        fig.savefig(png_path, dpi=110)
    except OSError as e:
        print(f"warning: could not write {png_path} ({e.strerror or e})", file=sys.stderr)
    finally:
        _pyplot().close(fig)


def plot_loss(rows: list[dict], png_path: str) -> None:
    """loss.png of a pretraining run: masked-token loss per optimizer step."""
    if not rows:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (masked tokens)")
    ax.set_title("mdtrain pretrain")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png_path)


def plot_curves(rows: list[dict], png_path: str) -> None:
    """curves.png of a finetune: train/val loss and val top-1/top-5 per epoch."""
    if not rows:
        return
    plt = _pyplot()
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], marker="o", label="train loss")
    a.plot(ep, [r["val_loss"] for r in rows], marker="o", label="val loss")
    a.set_xlabel("epoch")
    a.legend()
    for key in ("val_top1", "val_top5", "ema_top1"):
        if any(key in r for r in rows):
            b.plot([r["epoch"] for r in rows if key in r], [r[key] for r in rows if key in r], marker="o", label=key)
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy (%)")
    b.legend()
    fig.tight_layout()
    save_figure(fig, png_path)
