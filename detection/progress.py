"""A rich progress bar with loss and ETA on a terminal; plain, greppable lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    """`total` steps of long work. Plain lines give an ETA from the pace since the first step (the
    first one also pays for set-up: an ETA from it read 9,293 s for a 4-minute demo); `note` prints
    a line of its own, such as an epoch's validation figures, above a rich bar."""

    def __init__(self, total: int, description: str, every: int = 10, clock=time.monotonic, quiet: bool = False):
        self.total, self.description, self.every, self.clock = total, description, every, clock
        self.done, self.start, self.first, self.fields = 0, clock(), None, ""
        self.quiet = quiet  # a served request counts its steps and prints nothing
        self.console = Console(stderr=True)
        self.rich = self.console.is_terminal and not quiet
        if self.rich:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self.task = self.progress.add_task(description, total=total, info="")

    def __enter__(self) -> Bar:
        if self.rich:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.rich:
            self.progress.stop()

    def describe(self, description: str) -> None:
        self.description = description
        if self.rich:
            self.progress.update(self.task, description=description)

    def advance(self, **fields: float | str) -> None:
        self.done += 1
        self.fields = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        if self.rich:
            self.progress.update(self.task, advance=1, info=self.fields)
        elif not self.quiet and (self.done % self.every == 0 or self.done == self.total):
            print(
                f"{self.description} {self.done}/{self.total} {self._times()} {self.fields}",
                file=sys.stderr,
                flush=True,
            )
        if self.first is None:
            self.first = self.clock()

    def _times(self) -> str:
        now = self.clock()
        elapsed = f"elapsed {now - self.start:.0f}s"
        if self.first is None or self.done < 2:
            return f"{elapsed} eta ?"
        pace = (now - self.first) / (self.done - 1)
        return f"{elapsed} eta {pace * (self.total - self.done):.0f}s"

    def note(self, line: str) -> None:
        if self.rich:
            self.progress.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)
