"""One progress bar for every long stage (scan, pairs, export, synthetic corpora): rich, on stderr, or silent."""

from __future__ import annotations

from typing import Any


class Progress:
    """``advance(n, failed=False)`` per finished unit; ``close()`` at the end. Silent when disabled or empty.

    The bar shows done/total, the failures so far (when ``show_failed``), elapsed time and an ETA.
    """

    def __init__(self, label: str, total: int, enabled: bool = True, unit: str = "", show_failed: bool = False,
                 transient: bool = False):
        self.total = int(total)
        self.failed = 0
        self.done = 0
        self.enabled = bool(enabled) and self.total > 0
        self._bar: Any = None
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        columns: list[Any] = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
        if unit:
            columns.append(TextColumn(unit))
        if show_failed:
            columns.append(TextColumn("failed {task.fields[failed]}"))
        columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        self._bar = RichProgress(*columns, console=Console(stderr=True), transient=transient)
        self._task = self._bar.add_task(label, total=self.total, failed=0)
        self._bar.start()

    def advance(self, n: int = 1, failed: bool = False) -> None:
        self.done += n
        if failed:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=n, failed=self.failed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
