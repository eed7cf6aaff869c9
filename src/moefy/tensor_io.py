"""Lazy, one-tensor-at-a-time reading of a safetensors checkpoint (single file or sharded).

Weights are only ever read through safetensors: pickle checkpoints are refused upstream."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moefy.errors import MoefyError

INDEX_NAME = "model.safetensors.index.json"


class SavedTensors(Mapping):
    """A few named tensors kept in a safetensors file instead of memory, read back one at a time on access (the
    layer-wise reconstruction of a 7B model fits gigabytes of expert weights before the export writes them)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: Path):
        from safetensors.torch import save_file

        self.path = Path(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.path))
        self._keys = list(tensors)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as fh:  # closed at once: nothing stays mapped
            return fh.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class LazyCheckpoint:
    """Maps tensor names to shard files and reads a tensor only when asked."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._where = _tensor_locations(self.directory)
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._handle(name).get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        self._handle(name)  # a missing name or an unreadable file fails here, with its message
        try:
            # A handle of its own, closed at once: a cached handle keeps every page it has read mapped, so reading
            # a whole 13 GB checkpoint tensor by tensor would end with 13 GB resident. The tensor is a copy.
            with safe_open(str(self._where[name]), framework="pt") as fh:
                return fh.get_tensor(name)
        except SafetensorError as exc:
            raise MoefyError(f"corrupt tensor {name} in {self._where[name]}: {exc}") from exc

    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in set(self._where.values()))

    def _handle(self, name: str):
        path = self._where.get(name)
        if path is None:
            raise MoefyError(f"tensor {name} is missing from the checkpoint in {self.directory}")
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise MoefyError(f"corrupt or unreadable safetensors file {path}: {exc}") from exc
        return self._handles[path]


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _tensor_locations(directory: Path) -> dict[str, Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise MoefyError(f"corrupt shard index {index}: {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise MoefyError(f"shard files listed in {index} are missing: {', '.join(missing)}")
        return {name: directory / f for name, f in weight_map.items()}
    # What transformers loads: model.safetensors or model-*-of-*.safetensors. Other files (moefy's own
    # moefy_plan.safetensors beside a build's weights) are not model weights.
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise MoefyError(f"no .safetensors weights in {directory}")
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                where.update({k: f for k in fh.keys()})
        except (SafetensorError, OSError) as exc:
            raise MoefyError(f"corrupt or unreadable safetensors file {f}: {exc}") from exc
    return where
