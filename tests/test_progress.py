"""The one progress reporter (mdcache.progress.Meter) that extract, transcode, pretrain and finetune share: it
must tell a run waiting for its input from a run busy with the work, and print where asked only."""
import io
import time

from rich.console import Console

from mdcache.progress import Meter


def slow(n: int, seconds: float):
    for i in range(n):
        time.sleep(seconds)
        yield i


def test_loader_wait_is_told_apart_from_the_work():
    """Sleeping in the loader counts as waiting; sleeping in the work does not. Margins are wide: the point is
    which side the time lands on, not how fast anything runs."""
    starved = Meter("job", "steps", 5)
    for _ in starved.data(slow(5, 0.02)):
        starved.count(1)
    starved_rates = starved.rates()
    busy = Meter("job", "steps", 5)
    for _ in busy.data(range(5)):
        time.sleep(0.02)
        busy.count(1)
    busy_rates = busy.rates()
    assert starved_rates["data_wait"] > 0.8 and busy_rates["data_wait"] < 0.2
    assert 0 < busy_rates["items_per_s"] <= 5 / 0.1  # 5 items in at least 0.1 s


def test_a_report_starts_a_new_window_unless_cumulative():
    windowed, running = Meter("job", "steps", 4), Meter("job", "steps", 4, cumulative=True)
    rates = []
    for m in (windowed, running):
        m.started = m.t0 = time.perf_counter()  # each run's clock starts with it
        for _ in m.data(slow(2, 0.02)):
            m.count(1)
        m.report()
        for _ in m.data(range(2)):
            time.sleep(0.02)
            m.count(1)
        rates.append(m.rates())
    assert rates[0]["data_wait"] < 0.2  # only the busy half since the report
    assert 0.3 < rates[1]["data_wait"] < 0.7  # the whole run: half waiting
    assert running.items_total == windowed.items_total == 4 and windowed.waited_total > 0.03


def test_lines_show_the_fields_and_the_wait_and_quiet_prints_nothing():
    out = io.StringIO()
    m = Meter("pretrain", "steps", 10, 2, console=Console(file=out, width=200),
              fields={"loss": "loss {:.4f}", "lr": "lr {:.2e}"})
    with m:
        for _ in m.data(range(3)):
            m.count(8)
        row = m.report(5, loss=0.12345, lr=1e-3, ignored=1)
    line = out.getvalue().strip()
    assert line.startswith("pretrain 5/10 steps loss 0.1235 lr 1.00e-03 ") and line.endswith(
        f"img/s, data wait {row['data_wait']:.0%}"), line
    quiet = io.StringIO()
    q = Meter("pretrain", "steps", 10, quiet=True, console=Console(file=quiet))
    with q:
        q.advance()
        q.report(3, loss=1.0)
    assert q.bar is None and quiet.getvalue() == "" and q.completed == 3


def test_the_live_bar_renders_the_rate_and_the_wait():
    out = io.StringIO()
    m = Meter("extract", "shards", 4, live=True, quiet=True,  # quiet: extract's (no per-shard lines), the bar shows
              console=Console(file=out, force_terminal=True, width=160), fields={"loss": "loss {:.3f}"})
    with m:
        for _ in m.data(range(2)):
            m.count(3)
        m.advance()
        m.report(loss=0.5)
    text = out.getvalue()
    assert "extract" in text and "1/4" in text and "img/s" in text and "wait" in text and "loss 0.500" in text
