"""What the memory benchmarks read from the kernel about their own process: the peak resident set, and the anonymous
memory now. Anonymous memory is what must fit; the resident pages of a memory-mapped checkpoint also count in RSS,
but the kernel drops them under pressure."""

from __future__ import annotations

import resource
import threading
from pathlib import Path


def rss() -> int:
    """Peak resident set so far, in bytes (the kernel's exact high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def anon() -> int:
    """Anonymous resident memory now, in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon:")).split()[1]) * 1024


class AnonPeak:
    """The anonymous memory when the block starts (`start`) and its peak while it runs (`peak`), sampled every
    `every` seconds by a thread: a lower bound, since a shorter spike can fall between samples."""

    def __init__(self, every: float):
        self.every = every
        self._done = threading.Event()

    def __enter__(self) -> "AnonPeak":
        self.start = self.peak = anon()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, anon())

    def _sample(self) -> None:
        while not self._done.wait(self.every):
            self.peak = max(self.peak, anon())
