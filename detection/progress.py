"""A rich progress bar with loss and ETA on a terminal; plain, greppable lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    def __init__(self, total: int, description: str, every: int = 10):
        self.total, self.description, self.every = total, description, every
        self.done, self.start, self.fields = 0, time.monotonic(), ""
        self.console = Console(stderr=True)
        self.rich = self.console.is_terminal
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
        elif self.done % self.every == 0 or self.done == self.total:
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(
                f"{self.description} {self.done}/{self.total} elapsed {elapsed:.0f}s eta {eta:.0f}s {self.fields}",
                file=sys.stderr,
                flush=True,
            )
