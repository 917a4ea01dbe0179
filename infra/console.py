"""Terminal output shared by the CLI commands: a rich console, progress bars with a rate,
and tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class RateColumn(ProgressColumn):
    """Events per second of a task, e.g. ``85,120 ev/s``."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- ev/s" if speed is None else f"{speed:,.0f} ev/s", style="cyan")


def progress_bar() -> Progress:
    """A progress bar showing done/total, rate (events/s), elapsed time and ETA (on stderr)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


T = TypeVar("T")
Counter = Callable[[int], None]


def run_with_bar(description: str, work: Callable[[Counter, Counter], T]) -> T:
    """Run ``work(set_total, advance)`` under a progress bar: ``set_total(n)`` once the amount of
    work is known, ``advance(k)`` after each ``k`` items done. Returns what ``work`` returns."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=None)
        return work(lambda n: bar.update(task, total=n), lambda k: bar.advance(task, k))


def table(columns: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> Table:
    """A rich table of ``rows`` under ``columns`` (numbers right-aligned with separators)."""
    tbl = Table(title=title, title_justify="left", header_style="bold")
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) or r[i] is None for r in rows)
        for i in range(len(columns))
    ]
    for name, is_num in zip(columns, numeric, strict=True):
        tbl.add_column(str(name), justify="right" if is_num else "left")
    for row in rows:
        tbl.add_row(*(_fmt(v) for v in row))
    return tbl


def _fmt(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)
