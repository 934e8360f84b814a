"""Progress bars that suit where they are read: tqdm on a terminal, a few plain lines in a log.

On a terminal (and in a notebook) ``progress_bar`` is ``tqdm.auto.tqdm``, unchanged. When the output stream is a
file or a pipe (CI, sbatch, ``> log``) a redrawn bar would leave one line per redraw (``\\r`` counts as a line
break in most log viewers): 800 lines for an 800-step train. There a bar writes a whole line at each
``log_step`` of the total (10 %: 0 %, 10 %, ..., 100 %), or when ``log_interval`` seconds went by without one
(a long step, or no known total), and always a last line on close: about a dozen lines per loop.

Example::

    for step in progress_bar(range(800), desc="train", unit="step"):
        ...
    # in a log:  train:  10%|###       | 80/800 [00:01<00:09, 78.1step/s]  ...  train: 100%|...| 800/800 [...]
"""

from __future__ import annotations

import sys
from typing import Iterable

import tqdm.auto
import tqdm.autonotebook
import tqdm.std

LOG_STEP = 0.1  # share of the total between two log lines
LOG_INTERVAL = 60.0  # seconds: at most this long without a log line while the loop advances


class LogLines(tqdm.std.tqdm):
    """tqdm that writes whole lines (no carriage returns, no cursor moves) at ``log_step`` shares of the total
    or every ``log_interval`` seconds, and once more on close."""

    def __init__(self, *args, log_step: float = LOG_STEP, log_interval: float = LOG_INTERVAL, **kwargs):
        self._log_step, self._log_interval = log_step, log_interval
        self._next_n, self._line_t, self._line_n = 0.0, None, None
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
        super().__init__(*args, **kwargs)

    def _write_line(self) -> None:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._line_t, self._line_n = self._time(), self.n
        if self.total:
            step = self._log_step * self.total
            self._next_n = (int(self.n / step + 1e-9) + 1) * step

    def display(self, msg=None, pos=None) -> bool:
        if msg is not None:  # a clear ('') or a custom message: nothing to erase in a log
            return False
        if self.n == self._line_n:
            return True
        if (
            self._line_t is None
            or (self.total and self.n >= self._next_n)
            or self._time() - self._line_t >= self._log_interval
        ):
            self._write_line()
        return True

    def clear(self, nolock=False) -> None:
        pass  # lines in a log stay

    def close(self) -> None:
        if not self.disable and self.n != self._line_n and hasattr(self, "last_print_t"):
            self._ema_dt = lambda: None  # the final line shows the overall rate, as tqdm's does
            self._write_line()
        self.leave = False  # tqdm's own close would redraw and end the line once more
        super().close()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    iterable: Iterable | None = None, *, log_step: float = LOG_STEP, log_interval: float = LOG_INTERVAL, **kwargs
) -> tqdm.std.tqdm:
    """A progress bar over ``iterable`` (or ``total=`` updates) with tqdm's arguments: ``tqdm.auto.tqdm`` when
    ``file`` (default ``sys.stderr``) is a terminal or in a notebook; otherwise ``LogLines``, a line at each
    ``log_step`` share of the total (0.1: 10 %) or after ``log_interval`` seconds without one, and at the end."""
    notebook = tqdm.autonotebook.tqdm is not tqdm.std.tqdm
    if notebook or _is_terminal(kwargs.get("file") or sys.stderr):
        return tqdm.auto.tqdm(iterable, **kwargs)
    return LogLines(iterable, log_step=log_step, log_interval=log_interval, **kwargs)
