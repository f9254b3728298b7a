"""Progress bars for long steps, shown only on an interactive terminal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_iter(items: list[T], description: str, enabled: bool) -> Iterator[T]:
    """Yield ``items``, drawing a rich progress bar on stderr when ``enabled``."""
    if not enabled or not items:
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(description, total=len(items))
        for item in items:
            yield item
            progress.advance(task)
