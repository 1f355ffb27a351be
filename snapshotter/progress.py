"""Progress bars on stderr (rich), only where a person is watching."""
from __future__ import annotations

#: redraws a second: rich's default 10 took ~10% of a 150,000-row restore (its refresh thread
#: renders while holding the interpreter); 4 still moves smoothly to the eye
REFRESH_PER_SECOND = 4


class Progress:
    def __init__(self, description: str, *, total: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.description = description
        self.total = total
        self._progress = None
        self._task = None
        self._running = False

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, \
                TextColumn, TimeElapsedColumn
            self._progress = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                                          refresh_per_second=REFRESH_PER_SECOND)
            self._start()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def _start(self) -> None:
        if not self._running:
            self._progress.start()
            self._running = True

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if self._progress is not None:
            if description:
                self._progress.update(self._task, description=description)
            self._progress.advance(self._task, n)

    def step(self, description: str, n: int = 0, total: int | None = None) -> None:
        """Count ``n`` more under ``description``; a new description starts a new step (count
        back to 0, ``total`` its size if known), shown at once however short the step is."""
        if self._progress is None:
            return
        self._start()
        if description != self.description:
            self.description = description
            self._progress.reset(self._task, description=description, total=total, completed=n)
            self._progress.refresh()
        elif n:
            self._progress.advance(self._task, n)

    def pause(self) -> None:
        """Take the bar off the terminal (before a question); the next step puts it back."""
        if self._progress is not None and self._running:
            self._progress.stop()
            self._running = False

    def __exit__(self, *exc) -> None:
        self.pause()
