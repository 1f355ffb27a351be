"""Progress bars on stderr (rich), only where a person is watching."""
from __future__ import annotations


class Progress:
    def __init__(self, description: str, *, total: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.description = description
        self.total = total
        self._progress = None
        self._task = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, \
                TextColumn, TimeElapsedColumn
            self._progress = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if self._progress is not None:
            if description:
                self._progress.update(self._task, description=description)
            self._progress.advance(self._task, n)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
