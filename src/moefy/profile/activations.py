"""The calibration activations that the layer-by-layer passes (profile/runner.py, construct/reconstruct.py) carry
from one decoder layer to the next: one hidden-state tensor per calibration batch. They stay on the compute device
while they fit a memory budget; above it they live in a file on disk and one batch at a time visits the device.
Spilling changes where the floats wait between layers, never what is computed: the passes give the same bits.

The file is read and written with pread/pwrite, not memory-mapped: pages of a mapped file count in the process's
resident memory, which is exactly what the budget bounds; the OS page cache still keeps recent batches in RAM when
the machine has it to spare. The file is unlinked as soon as it is opened, so a killed run leaves nothing behind."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from moefy.errors import MoefyError
from moefy.models import free_memory
from moefy.recipes import parse_bytes
from moefy.sources import cache_dir


def activation_budget(max_memory: str | None, device: torch.device) -> int:
    """Bytes the cached activations may take on the device: the user's --max-memory, or half of what is free when
    the pass starts (the other half is for the decoder layer, its intermediate tensors and the statistics)."""
    return parse_bytes(max_memory) if max_memory is not None else free_memory(device) // 2


class Activations:
    """Per-batch fp32 tensors of fixed shapes, indexable like a list. Reading a batch gives it on the device (the
    stored tensor itself when in memory, a fresh copy when spilled); writing one replaces it. The passes only ever
    replace a batch, never change one in place, so the two behave the same for them."""

    def __init__(self, shapes: list[tuple[int, ...]], device: torch.device, budget: int,
                 directory: Path | None = None):
        self.shapes, self.device = [tuple(s) for s in shapes], device
        sizes = [math.prod(s) * 4 for s in self.shapes]
        self.nbytes = sum(sizes)
        self.spilled = self.nbytes > budget
        self._items: list[torch.Tensor | None] = [None] * len(shapes)
        self._fd = None
        if self.spilled:
            # not /tmp: it is RAM-backed on many systems, which would defeat the spill
            where = Path(directory) if directory is not None else cache_dir() / "activations"
            try:
                where.mkdir(parents=True, exist_ok=True)
                self._fd, path = tempfile.mkstemp(dir=where, suffix=".f32")
                os.unlink(path)
                os.ftruncate(self._fd, self.nbytes)
            except OSError as exc:
                raise MoefyError(f"cannot spill {self.nbytes / 2**30:.2f} GiB of calibration activations to {where}: "
                                 f"{exc.strerror} (free disk there, or raise --max-memory)") from exc
            self._offsets = [sum(sizes[:b]) for b in range(len(sizes))]

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, b: int) -> torch.Tensor:
        if not self.spilled:
            return self._items[b]
        out = torch.empty(self.shapes[b], dtype=torch.float32)
        view = memoryview(out.numpy()).cast("B")
        done = 0
        while done < len(view):  # a single pread returns at most ~2 GB on Linux
            done += os.preadv(self._fd, [view[done:]], self._offsets[b] + done)
        return out.to(self.device)

    def __setitem__(self, b: int, value: torch.Tensor) -> None:
        if tuple(value.shape) != self.shapes[b]:
            raise ValueError(f"batch {b}: shape {tuple(value.shape)}, expected {self.shapes[b]}")
        if not self.spilled:
            self._items[b] = value
            return
        view = memoryview(value.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], self._offsets[b] + done)

    def __iter__(self):
        return (self[b] for b in range(len(self)))

    def copy(self, budget: int, directory: Path | None = None) -> Activations:
        """A second store with the same contents (its own budget decides where it lives)."""
        other = Activations(self.shapes, self.device, budget, directory)
        for b in range(len(self)):
            other[b] = self[b].clone() if not self.spilled else self[b]
        return other

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._items = [None] * len(self.shapes)

    def __del__(self):
        self.close()
