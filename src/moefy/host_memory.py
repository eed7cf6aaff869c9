"""Host memory and glibc's allocator: handing freed memory back to the OS between the layers of a calibration pass,
and keeping large freed blocks for reuse while a model reads its weights as float32 in every forward."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt's parameters and glibc's defaults for them (malloc.h, mallopt(3)).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP_ALL = 2**31 - 1  # mallopt takes an int: trim the heap's top only once more than 2 GiB of it is free
_reusing = 0  # depth of nested reuse_freed_blocks blocks


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim, their allocators behave differently
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed() -> None:
    """Return the heap's free pages to the OS. A layer-by-layer pass frees one layer's tensors and allocates the next
    one's; glibc keeps the freed blocks for reuse, fragmented, so without this the resident peak grew by about
    20 MiB per layer (1B shape, profiling: 0.83 GiB above imports at the last of 22 layers against 0.47 with a
    trim per layer; `bench/bench_calibration.py --per-layer [--no-trim]`), and a bigger model would grow further.
    One call per layer costs milliseconds."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def reuse_freed_blocks() -> Iterator[None]:
    """Inside the block, glibc serves every allocation from its heap and keeps what is freed there for reuse.
    Why: a model whose weights stay bf16 and are read as float32 (models.read_as_float32: training with
    `frozen_dtype: source`, and eval where memory is short) allocates a float32 copy of each weight in every
    forward, and in backward's recomputation again. glibc maps every block above 32 MiB fresh from the OS and
    unmaps it when freed, so each copy faulted all its pages in anew, and the faults took a fifth or more of a
    training step's time (docs/benchmarks.md, "Training memory": page faults and step rates with and without).
    Reused blocks are already mapped. The cost is the heap's fragmentation: 4-13% more anonymous peak for 1B and 7B
    training and eval (docs/benchmarks.md). verify does without: a 7B verify ran 15% faster for 20% more anonymous
    peak (docs/benchmarks.md, "Eval and verify memory"), too near a 24 GB machine's edge. On exit glibc's defaults
    come back (its mmap threshold stays where it was, no longer adjusted) and the free memory is trimmed. Nested
    blocks share the outermost one."""
    global _reusing
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    if _reusing == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)
    _reusing += 1
    try:
        yield
    finally:
        _reusing -= 1
        if _reusing == 0:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
