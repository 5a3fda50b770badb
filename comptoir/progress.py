"""Progress of the long commands (backup, restore, verify, migrate): a rich bar on a terminal, nothing
otherwise, so that scripts, cron jobs and CI logs get only the result lines."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class Progress:
    """One task's progress; every method does nothing when the output is not a terminal."""

    def __init__(self, bar: Any = None, task: Any = None) -> None:
        self._bar = bar
        self._task = task

    def total(self, total: float | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def update(self, completed: float, total: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total)

    def advance(self, amount: float = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def step(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description)


@contextmanager
def progress(description: str, total: float | None = None, stream: TextIO | None = None) -> Iterator[Progress]:
    """A progress bar on ``stream`` (standard error) when it is a terminal."""
    out = stream or sys.stderr
    if not out.isatty():
        yield Progress()
        return
    from rich import progress as rich_progress
    from rich.console import Console
    from rich.progress import BarColumn, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

    console = Console(file=out, force_terminal=True)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with rich_progress.Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield Progress(bar, task)
        bar.update(task, completed=bar.tasks[0].total or 1, total=bar.tasks[0].total or 1)
