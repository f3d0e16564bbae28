"""The progress bar of the CLI and the shell: patch positions done of an OCCLUDE.

A :class:`ProgressBar` is the ``progress(done, total)`` callback of
:meth:`kql.Connection.run`. The tqdm bar (on stderr) is made on the first call of a
statement and removed by :meth:`ProgressBar.close`, which the caller runs after each
statement; the next statement's first call makes a fresh bar.

>>> import io
>>> stream = io.StringIO()
>>> with ProgressBar(stream=stream) as bar:
...     bar(16, 56)
...     bar(56, 56)
>>> "0/56 [" in stream.getvalue(), "positions/s" in stream.getvalue()
(True, True)
>>> ProgressBar(enabled=False)(1, 2)  # a disabled bar writes nothing
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """Positions done / total and the rate, as one tqdm line that clears when done."""

    def __init__(self, enabled: bool = True, stream: Optional[TextIO] = None,
                 desc: str = "occlude"):
        self.enabled = enabled
        self.stream = stream
        self.desc = self._first_desc = desc
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is not None and (done < self._bar.n or total != self._bar.total):
            self.close()                    # a new OCCLUDE began without a close()
        if self._bar is None:
            self._bar = self._new_bar(total)
        self._bar.update(done - self._bar.n)

    def describe(self, text: str) -> None:
        """The bar's label from now on (a many-image query: ``occlude 3/200 images``)."""
        self.desc = text
        if self._bar is not None:
            self._bar.set_description_str(text, refresh=False)

    def _new_bar(self, total: int):
        from tqdm import tqdm

        return tqdm(total=total, desc=self.desc, unit=" positions", unit_scale=False,
                    file=self.stream if self.stream is not None else sys.stderr,
                    leave=False, dynamic_ncols=True)

    def close(self) -> None:
        """Remove the current bar (if any); safe to call any number of times."""
        bar, self._bar = self._bar, None
        self.desc = self._first_desc
        if bar is not None:
            bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunProgress:
    """The positions done of the query that runs, for someone who asks now and then (the
    web viewer's ``GET /api/progress``): the ``progress(done, total)`` callback of
    :meth:`kql.Connection.execute`, and :meth:`state`, the line a :class:`ProgressBar` shows."""

    def __init__(self):
        self.phase, self.done, self.total = "", 0, 0
        self.started, self.running = 0.0, False

    def start(self, phase: str) -> None:
        self.phase, self.done, self.total = phase, 0, 0
        self.started, self.running = time.monotonic(), True

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = int(done), int(total)

    def stop(self) -> None:
        self.running = False

    def state(self) -> dict:
        """What the page shows: the numbers and one line of text, as the shell's bar.

        >>> p = RunProgress(); p.start("exact map"); p(0, 10)
        >>> p.state()["text"]
        'exact map: planning ...'
        """
        seconds = time.monotonic() - self.started if self.started else 0.0
        rate = self.done / seconds if self.done and seconds > 0 else None
        eta = (self.total - self.done) / rate if rate else None
        if not self.total or not self.done:
            text = f"{self.phase}: planning ..."
        else:
            text = (f"{self.phase}: {self.done:,}/{self.total:,} positions "
                    f"({100 * self.done // self.total}%), {rate:,.0f} positions/s"
                    + (f", about {eta:.0f} s left" if eta is not None and self.done < self.total else ""))
        return {"running": self.running, "phase": self.phase, "done": self.done,
                "total": self.total, "seconds": round(seconds, 3),
                "eta_seconds": None if eta is None else round(eta, 3), "text": text}
