"""Progress bars of the maps a ``duanflow run`` entrypoint starts (rich, on stderr)."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from duanflow._map import MapProgress


class MapBar:
    """One map's bar: results so far of the inputs sent so far (the total is known once every input is sent)."""

    def __init__(self, console: Console, label: str) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task: TaskID = self._progress.add_task(f"{escape(label)}.map()", total=None, rate="")
        self._progress.start()

    def update(self, done: int, submitted: int, exhausted: bool) -> None:
        """Move the bar: ``done`` of ``submitted`` (of the total, once ``exhausted``)."""
        task = self._progress.tasks[0]
        elapsed = task.elapsed or 0.0
        rate = f"{done / elapsed:,.0f}/s" if elapsed > 0 and done else ""
        self._progress.update(self._task, completed=done, total=submitted if exhausted else None, rate=rate)

    def close(self) -> None:
        """Leave the final state on screen."""
        self._progress.stop()


def map_bars(console: Console) -> Callable[[str], MapProgress]:
    """A factory for :func:`duanflow._map.show_progress` drawing on ``console``."""

    def factory(label: str) -> MapProgress:
        return MapBar(console, label)

    return factory
