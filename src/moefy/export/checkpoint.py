"""Stream MoE safetensors shards one layer at a time: from a dense checkpoint plus a MoEPlan (build), or from a
loaded model (train's export)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from moefy.construct.plan import MoEPlan
from moefy.export.formats import OutputFormat
from moefy.families import Family
from moefy.models import DTYPES
from moefy.progress import progress
from moefy.tensor_io import LazyCheckpoint
from moefy.tensor_writer import ShardedWriter, TensorSpec

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def write_checkpoint(reader: LazyCheckpoint, family: Family, config: dict, plan: MoEPlan, fmt: OutputFormat,
                     directory: Path, dtype: str, max_shard_bytes: int) -> int:
    """Write the MoE weights into `directory`; returns the total parameter count written."""

    def out_dtype(name: str) -> torch.dtype:
        return reader.dtype(name) if dtype == "source" else DTYPES[dtype]

    # Tensors in reading order: everything outside the decoder layers, then layer by layer (the layer's own
    # non-FFN tensors, then its experts), so each layer's dense FFN is read once and dropped.
    outside = sorted(n for n in reader.names() if _layer_of(n) is None)
    by_layer: dict[int, list[str]] = {i: [] for i in range(plan.meta.num_layers)}
    for name in reader.names():
        if _layer_of(name) is not None and not family.is_ffn_key(name):
            by_layer[_layer_of(name)].append(name)
    def extras(i: int) -> list[TensorSpec]:
        dtype = out_dtype(family.ffn_key(i, "down"))
        return [TensorSpec(s.name, s.shape, dtype) for s in fmt.layer_extras(i, config)]

    specs = [TensorSpec(n, reader.shape(n), out_dtype(n)) for n in outside]
    for i, names in by_layer.items():
        specs += [TensorSpec(n, reader.shape(n), out_dtype(n)) for n in sorted(names)]
        specs += extras(i)
        specs += fmt.ffn_specs(i, plan.meta, out_dtype(family.ffn_key(i, "down")))

    writer = ShardedWriter(directory, specs, max_shard_bytes)
    for name in outside:
        writer.write(name, reader.get(name).to(out_dtype(name)))
    for i in progress(by_layer, "writing experts", total=len(by_layer)):
        for name in sorted(by_layer[i]):
            writer.write(name, reader.get(name).to(out_dtype(name)))
        for spec in extras(i):
            writer.write(spec.name, torch.zeros(spec.shape, dtype=spec.dtype))
        ffn = {w: reader.get(family.ffn_key(i, w)) for w in ("gate", "up", "down")}
        target = out_dtype(family.ffn_key(i, "down"))
        # read in the checkpoint's dtype; ffn_tensors scales down_proj slices in fp32 and each is cast once here
        for name, tensor in fmt.ffn_tensors(i, plan.meta, plan.layers.get(i), ffn["gate"], ffn["up"], ffn["down"]):
            writer.write(name, tensor.to(target))
    writer.close()
    return sum(torch.Size(s.shape).numel() for s in specs)


def write_model(model, directory: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """A loaded transformers model in `dtype`, as save_pretrained writes it (tied weights once, fused experts
    reverted to the per-expert tensors of the standard layout), streamed one decoder layer at a time.
    save_pretrained reverts the whole state dict at once, and the revert copies every fused gate_up tensor it
    splits, so its peak was the model plus two thirds of its experts."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    groups: dict[int, list[str]] = {}
    for name in state:
        layer = _layer_of(name)
        groups.setdefault(-1 if layer is None else layer, []).append(name)

    def on_disk(names: list[str], meta: bool) -> dict[str, torch.Tensor]:
        # The revert's renames and splits act within one decoder layer, so a layer reverts on its own; on the meta
        # device it gives the names and shapes the shard headers need without touching a weight.
        def cast(t: torch.Tensor) -> torch.Tensor:
            dt = dtype if t.is_floating_point() else t.dtype
            return torch.empty(t.shape, dtype=dt, device="meta") if meta else t.to(device="cpu", dtype=dt)
        return revert_weight_conversion(model, {n: cast(state[n]) for n in names})

    order = sorted(groups)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for g in order for n, t in sorted(on_disk(groups[g], True).items())]
    writer = ShardedWriter(directory, specs, max_shard_bytes)
    for g in progress(order, "writing the model"):
        for name, tensor in sorted(on_disk(groups[g], False).items()):
            writer.write(name, tensor)
    writer.close()
    config = copy.deepcopy(model.config)
    config.dtype, config.architectures = str(dtype).removeprefix("torch."), [type(model).__name__]
    config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
