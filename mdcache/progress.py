"""One progress reporter for every long job (extract, transcode, pretrain, finetune).

Like MAE's MetricLogger it times the wait for the next batch apart from the work on it: `data_wait` is the
share of wall time spent blocked on the loader, the first number to read when a GPU is underfed (near 0: the
input side keeps up; near 1: the model waits for data). A rich bar when stderr is a terminal, else one plain
line per `report` (logs that do not fill with bar redraws); nothing on ranks other than 0.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def live_default() -> bool:
    """A live bar only where someone watches: stderr is a terminal (MDCACHE_PROGRESS=1 forces it)."""
    import os

    return sys.stderr.isatty() or bool(os.environ.get("MDCACHE_PROGRESS"))


class Meter:
    """Counts work and loader wait; shows them as a bar or as lines.

    `what`: the job's name; `unit`: what `total` counts (steps, shards); the rate counts images. `fields`
    formats the values `report` is given, e.g. {"loss": "loss {:.4f}"}. Rates cover the time since the last
    report (a training log's window), or since the start with `cumulative` (a job's running average). `live`:
    a bar (the caller decides: rank 0 on a terminal); `quiet`: no lines without one.
    """

    def __init__(self, what: str, unit: str, total: int, done: int = 0, *, live: bool = False,
                 quiet: bool = False, cumulative: bool = False, fields: dict[str, str] | None = None,
                 console: Console | None = None):
        self.what, self.unit, self.total, self.live, self.quiet = what, unit, total, live, quiet  # quiet: no lines
        self.cumulative, self.fields = cumulative, fields or {}
        self.console = console or Console(stderr=True, soft_wrap=True)  # log lines never wrap mid-sentence
        self.completed = done
        self.started = time.perf_counter()
        self.items_total, self.waited_total = 0, 0.0  # since the start; `items`, `waited`: since the last report
        self.bar: Progress | None = None
        self._reset()

    def _reset(self) -> None:
        self.t0, self.items, self.waited = time.perf_counter(), 0, 0.0

    def restart(self) -> None:
        """A new rate window now (an epoch starts: the last one's evaluation and checkpoint are not its work)."""
        self._reset()

    def __enter__(self) -> "Meter":
        if self.live:
            extra = [TextColumn("{task.fields[" + k + "]}") for k in self.fields]
            self.bar = Progress(TextColumn(f"[bold]{self.what}[/]"), BarColumn(), MofNCompleteColumn(),
                                TextColumn(self.unit), *extra, TextColumn("{task.fields[rate]}"),
                                TextColumn("wait {task.fields[wait]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=self.console)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.what, total=self.total, completed=self.completed, rate="-", wait="-",
                                          **{k: "-" for k in self.fields})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Time inside counts as loader wait (reading the input, not working on it)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.waited += dt
            self.waited_total += dt

    def data(self, loader: Iterable) -> Iterator:
        """The loader's batches, with the time spent waiting for each counted as loader wait."""
        it = iter(loader)
        while True:
            with self.waiting():
                batch = next(it, _END)
            if batch is _END:
                return
            yield batch

    def count(self, items: int) -> None:
        self.items += items
        self.items_total += items

    def advance(self, n: int = 1) -> None:
        """Progress in `unit`s without a report (a bar moves; lines wait for `report`)."""
        self.completed += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.completed)

    def rates(self) -> dict:
        """{items_per_s, data_wait}: since the last report, or since the start when cumulative."""
        if self.cumulative:
            items, waited, dt = self.items_total, self.waited_total, time.perf_counter() - self.started
        else:
            items, waited, dt = self.items, self.waited, time.perf_counter() - self.t0
        dt = max(dt, 1e-9)
        return {"items_per_s": round(items / dt, 2), "data_wait": round(min(waited / dt, 1.0), 4)}

    def report(self, completed: int | None = None, **values: Any) -> dict:
        """The rates (then a new window starts), shown with `values` on the bar or as one line."""
        row = self.rates()
        self._reset()
        if completed is not None:
            self.completed = completed
        shown = {k: fmt.format(values[k]) for k, fmt in self.fields.items() if k in values}
        if self.bar is not None:
            self.bar.update(self.task, completed=self.completed, rate=f"{row['items_per_s']:.1f} img/s",
                            wait=f"{row['data_wait']:.0%}", **shown)
        elif not self.quiet:
            self.console.print(" ".join([f"{self.what} {self.completed}/{self.total} {self.unit}", *shown.values(),
                                         f"{row['items_per_s']:.1f} img/s, data wait {row['data_wait']:.0%}"]),
                               highlight=False)
        return row


_END = object()
