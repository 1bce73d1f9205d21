"""Progress for long stages: a tqdm bar on a terminal, plain periodic log lines otherwise.

Logs on a cluster are files, where a redrawn bar is noise; so when stderr is not a terminal a line
with done / total, rate and ETA is printed at most every ``interval`` seconds.
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


class Progress:
    def __init__(self, desc: str, total: float | None = None, unit: str = "", interval: float = 10.0,
                 enabled: bool = True, stream=None):
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.stream = stream or sys.stderr
        self.done = 0.0
        self.extra = ""
        self._t0 = self._last = time.time()
        self._bar = None
        self.enabled = enabled
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit or "it", unit_scale=True, file=self.stream,
                             dynamic_ncols=True)

    def update(self, n: float = 1, extra: str = "") -> None:
        self.done += n
        if extra:
            self.extra = extra
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if extra:
                self._bar.set_postfix_str(extra, refresh=False)
            return
        now = time.time()
        if now - self._last >= self.interval:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = max(now - self._t0, 1e-9)
        rate = self.done / elapsed
        parts = [f"[{self.desc}] {_human(self.done, self.unit)}"]
        if self.total:
            parts[0] += f" / {_human(self.total, self.unit)} ({100 * self.done / self.total:.1f}%)"
            if rate > 0:
                parts.append(f"ETA {max(self.total - self.done, 0) / rate:.0f}s")
        parts.append(f"{_human(rate, self.unit)}/s")
        if self.extra:
            parts.append(self.extra)
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.done:
            self._line(time.time())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
