"""Progress display for long loops (rich), quiet when MOEFY_QUIET is set (tests, nested calls)."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None,
             status: dict[str, str] | None = None) -> Iterable[T]:
    """Yield `items` under a progress bar. `status` is shown after the bar and re-read after every item, so a
    loop can put its latest numbers (loss, tokens/s) there."""
    if os.environ.get("MOEFY_QUIET"):
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total if total is not None else _length(items), status="")
        for item in items:
            yield item
            bar.update(task, advance=1, status="  ".join(f"{k} {v}" for k, v in (status or {}).items()))


def _length(items) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None
