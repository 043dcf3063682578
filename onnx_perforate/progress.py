"""Progress bars that suit where they are written: tqdm on a terminal; elsewhere (a log file, CI) a
plain line at every tenth of the work, instead of a redraw per step joined by carriage returns."""

from __future__ import annotations

import sys
import time


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", leave: bool = False, file=None):
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`LineProgress`."""
    file = file or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _is_terminal(file):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=file)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, file=file)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """The part of tqdm's interface the package uses (iteration, update, set_postfix[_str], close),
    writing one line each time another tenth of ``total`` is done (every 30 s when the total is
    unknown) and one at the end: at most a dozen lines. A line is written at the first postfix change,
    update or close after the tenth is reached, so that it shows the postfix of that step (the tuner
    sets the step's result right after counting it)."""

    STEPS = 10
    INTERVAL_S = 30.0

    def __init__(self, iterable=None, *, desc: str, total: int | None, unit: str, file):
        self.iterable, self.desc, self.total, self.unit, self.file = iterable, desc, total, unit, file
        self.n = 0
        self.postfix = ""
        self.started = self.last_written = time.perf_counter()
        self.written_tenths = 0
        self.pending = False
        self.written_n = None
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text
        self._flush()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        self._flush()

    def update(self, n: int = 1) -> None:
        self._flush()
        self.n += n
        if self.total:
            tenths = min(self.STEPS, self.n * self.STEPS // self.total)
            if tenths > self.written_tenths:
                self.written_tenths = tenths
                self.pending = True
        elif time.perf_counter() - self.last_written >= self.INTERVAL_S:
            self.pending = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pending or self.n != self.written_n:  # the last state has not been written yet
            self._write(final=not self.total or self.n < self.total)

    def _flush(self) -> None:
        if self.pending:
            self._write()

    def _write(self, final: bool = False) -> None:
        now = self.last_written = time.perf_counter()
        self.pending, self.written_n = False, self.n
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f" ({100 * self.n // self.total}%)" if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        end = " done" if final else ""
        self.file.write(f"{self.desc}: {count} {self.unit}{percent} in {now - self.started:.0f} s{postfix}{end}\n")
        self.file.flush()
