"""Progress lines as a log file shows them: steady-state rate and ETA, seconds per unit when slow, one final line."""

from __future__ import annotations

import io

from cllama_dist import progress
from cllama_dist.progress import Progress, rate_text


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_eta_comes_from_the_steady_state_not_the_start_up(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "time", clock)
    out = io.StringIO()
    bar = Progress("train", total=100, unit="step", interval=0, stream=out)
    clock.t += 60  # start-up: the first step takes a minute
    bar.update(1)
    for _ in range(9):  # then a step a second
        clock.t += 1
        bar.update(1)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("[train] 10 step / 100 step (10.0%)") and "ETA 90s" in last and "1 step/s" in last
    n = len(out.getvalue().splitlines())
    bar.close()  # the last line already says it all: not printed twice
    assert len(out.getvalue().splitlines()) == n
    quiet = io.StringIO()
    bar = Progress("eval", total=5, unit="doc", interval=3600, stream=quiet)
    for _ in range(5):
        clock.t += 2
        bar.update(1)
    bar.close()
    bar.close()
    assert quiet.getvalue().splitlines() == ["[eval] 5 doc / 5 doc (100.0%), 2.0 s/doc, in 10s"]


def test_slow_rates_read_as_seconds_per_unit():
    assert rate_text(0.25, "step") == "4.0 s/step"
    assert rate_text(3.0, "step") == "3 step/s"
    assert rate_text(0.5, "B") == "0.5 B/s"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_terminal_bar_counts_steps_in_whole_numbers():
    out = Terminal()
    bar = Progress("train", total=60, unit="step", stream=out)
    for _ in range(3):
        bar.update(1, "loss 3.2")
    bar.close()
    last = out.getvalue().split("\r")[-1]
    assert "3/60 " in last and "." not in last.split("|")[2].split("[")[0], last
    out = Terminal()
    bar = Progress("read", total=123_456_789, unit="B", stream=out)  # bytes keep their scaled units
    bar.update(1_000_000)
    bar.close()
    assert "1.00M/123M" in out.getvalue().split("\r")[-1]
