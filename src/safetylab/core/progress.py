"""Progress for long work: a rich bar on a terminal, plain line-buffered log lines otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    """``with Progress("train", total) as p: p.advance(1, loss=...)``.

    Off a terminal (CI, pipes) it prints at most ``lines`` evenly spaced lines with the latest
    values, flushed at once, so logs stay short and readable.
    """

    def __init__(self, description: str, total: int, stream: TextIO | None = None, lines: int = 10):
        self.description = description
        self.total = max(int(total), 1)
        self.stream = stream or sys.stderr
        self.every = max(self.total // max(lines, 1), 1)
        self.done = 0
        self.start = time.perf_counter()
        self._rich: RichProgress | None = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.stream.isatty():
            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total, status="")
        return self

    def advance(self, n: int = 1, **values: float) -> None:
        self.done += n
        status = "  ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        if self._rich is not None:
            self._rich.update(self._task, advance=n, status=status)
        elif self.done % self.every == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.start
            print(
                f"[{self.description}] {self.done}/{self.total} {elapsed:6.1f}s {status}".rstrip(),
                file=self.stream,
                flush=True,
            )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._rich is not None:
            self._rich.stop()


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
