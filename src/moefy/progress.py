"""Progress display for long loops (rich), quiet when MOEFY_QUIET is set (tests, nested calls)."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    if os.environ.get("MOEFY_QUIET"):
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        yield from bar.track(items, total=total, description=description)
