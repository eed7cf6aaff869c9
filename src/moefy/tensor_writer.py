"""A streaming safetensors writer: the header of each shard is computed up front from the tensor specs, so
tensors are written to disk as they are produced and memory never holds more than one tensor."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# Shards of 2 GiB: small enough to fetch and mmap piecewise, few enough that a 7B model is a handful of files.
SHARD_BYTES = 2 * 1024**3

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def _shard(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


class ShardedWriter:
    """Write tensors in exactly the order of `specs`, into shards of at most max_bytes (HF naming + index; `stem`
    names other files than a model's, such as the profiler's stats)."""

    def __init__(self, directory: Path, specs: list[TensorSpec], max_bytes: int, stem: str = "model",
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.shards = _shard(specs, max_bytes)
        self.stem, self.metadata = stem, metadata or {"format": "pt"}
        n = len(self.shards)
        self.files = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
                                                             for i in range(n)]
        self._queue = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._pos = 0
        self._open: tuple[int, object] | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, spec = self._queue[self._pos]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise RuntimeError(f"writer expected {spec} but got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if self._open is None or self._open[0] != shard:
            self._start(shard)
        self._open[1].write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._queue):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        self._finish()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for _, s in self._queue)},
                     "weight_map": {s.name: self.files[i] for i, s in self._queue}}
            (self.directory / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def _start(self, shard: int) -> None:
        self._finish()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for s in self.shards[shard]:
            header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        fh = open(self.directory / self.files[shard], "wb")
        fh.write(struct.pack("<Q", len(raw)) + raw)
        self._open = (shard, fh)

    def _finish(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None
