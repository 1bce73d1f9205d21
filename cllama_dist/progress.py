"""Progress for long stages: a tqdm bar on a terminal, plain periodic log lines otherwise.

Logs on a cluster are files, where a redrawn bar is noise; so when stderr is not a terminal a line with
done / total, rate and ETA is printed at most every ``interval`` seconds. The rate and the ETA come from
the steady state: the first update (start-up, compilation, the first collective) is left out of them,
because it made first ETAs several times too long (676 s announced for a 106 s stage). Rates below one
unit per second read as seconds per unit ("4.2 s/step", not "0 step/s"). The last line is printed once.
"""

from __future__ import annotations

import sys
import time


def _human(n: float, unit: str) -> str:
    if unit == "B":
        for u in ("B", "KB", "MB", "GB", "TB"):
            if abs(n) < 1000 or u == "TB":
                return f"{n:.1f} {u}"
            n /= 1000
    return f"{n:,.0f} {unit}".strip()


def rate_text(rate: float, unit: str) -> str:
    """Units per second, or seconds per unit below one a second."""
    if unit != "B" and 0 < rate < 1:
        return f"{1 / rate:.1f} s/{unit or 'it'}"
    return f"{_human(rate, unit)}/s"


class Progress:
    def __init__(self, desc: str, total: float | None = None, unit: str = "", interval: float = 10.0,
                 enabled: bool = True, stream=None):
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.stream = stream or sys.stderr
        self.done = 0.0
        self.extra = ""
        self._t0 = self._last = time.time()
        self._steady: tuple[float, float] | None = None  # (time, done) after the first update
        self._printed_at: float | None = None
        self._bar = None
        self.enabled = enabled
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            # Counts (steps, blocks, questions) as whole numbers: tqdm's unit_scale writes every count as a float
            # ("3.00/60.0 step"); bytes keep it (1.2 MB).
            whole = total if total is None or total != int(total) else int(total)
            self._bar = tqdm(total=whole, desc=desc, unit=unit or "it", unit_scale=unit == "B", file=self.stream,
                             dynamic_ncols=True, disable=False)  # our own bar: shown even when TQDM_DISABLE mutes libraries

    def update(self, n: float = 1, extra: str = "") -> None:
        self.done += n
        now = time.time()
        if self._steady is None:
            self._steady = (now, self.done)
        if extra:
            self.extra = extra
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if extra:
                self._bar.set_postfix_str(extra, refresh=False)
            return
        if now - self._last >= self.interval:
            self._last = now
            self._line(now)

    def rate(self, now: float | None = None) -> float | None:
        """Steady-state rate (units per second), or None before a second update."""
        now = time.time() if now is None else now
        if self._steady is None:
            return None
        t, d = self._steady
        if self.done <= d or now <= t:
            return None
        return (self.done - d) / (now - t)

    def _line(self, now: float, final: bool = False) -> None:
        rate = self.rate(now)
        if rate is None and final:  # a single update: the whole time is all there is
            rate = self.done / max(now - self._t0, 1e-9)
        parts = [f"[{self.desc}] {_human(self.done, self.unit)}"]
        if self.total:
            parts[0] += f" / {_human(self.total, self.unit)} ({100 * self.done / self.total:.1f}%)"
            if rate and not final:
                parts.append(f"ETA {max(self.total - self.done, 0) / rate:.0f}s")
        if rate:
            parts.append(rate_text(rate, self.unit))
        if final:
            parts.append(f"in {now - self._t0:.0f}s")
        if self.extra:
            parts.append(self.extra)
        print(", ".join(parts), file=self.stream, flush=True)
        self._printed_at = self.done

    def finish(self) -> None:
        """The work is complete: the total is what was done (an estimated total, e.g. bytes of text)."""
        if self.total is not None:
            self.total = self.done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.done and self._printed_at != self.done:
            self._line(time.time(), final=True)
            self._printed_at = self.done

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
