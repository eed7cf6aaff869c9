"""What the memory benchmarks read from the kernel about their own process: the peak resident set, and the anonymous
memory now. Anonymous memory is what must fit; the resident pages of a memory-mapped checkpoint also count in RSS,
but the kernel drops them under pressure."""

from __future__ import annotations

import resource
from pathlib import Path


def rss() -> int:
    """Peak resident set so far, in bytes (the kernel's exact high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def anon() -> int:
    """Anonymous resident memory now, in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon:")).split()[1]) * 1024
