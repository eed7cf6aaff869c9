"""The MoEPlan: per MoE layer, which dense FFN neurons each expert holds, the router init and the output scale.

Saved as moefy_plan.json (metadata) + moefy_plan.safetensors (index and router tensors) and validated on load,
so a plan can be inspected and checked (moefy verify) without re-running construction. Weights fitted by
reconstruction are not saved twice: they are the checkpoint's expert weights, and the plan lists which they are."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moefy.errors import MoefyError

PLAN_JSON = "moefy_plan.json"
PLAN_TENSORS = "moefy_plan.safetensors"
PAD = -1  # an index slot holding a zero neuron (gate row, up row and down column all zero: adds exactly 0)


class PlanMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    source: str
    family: str
    method: str
    num_layers: int
    num_experts: int
    top_k: int
    ffn_width: int
    hidden_size: int
    expert_size: int
    moe_layers: list[int]  # the others stay dense
    scales: list[float]  # one per MoE layer, folded into each routed expert's down_proj
    shared_size: int = 0  # always-on shared neurons per MoE layer (PAD-filled where a layer has fewer)
    # "partition": every dense neuron in exactly one expert; "overlap": experts may share neurons.
    coverage: Literal["partition", "overlap"] = "partition"
    seed: int = 0
    domain_groups: list[list[str]] | None = None  # dive: the calibration domains behind each expert
    calibration: dict | None = None  # the calibration corpus as read: source, documents, records skipped and why
    # per MoE layer, the expert weights that reconstruction fitted (LayerPlan.fitted's keys); filled in on save
    fitted: dict[int, list[str]] = {}

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (gate, up and down rows for expert_size neurons)."""
        return 3 * self.hidden_size * self.expert_size

    def active_params(self, total: int) -> int:
        """Parameters touched per token: all but the (N - k) unrouted experts in each MoE layer."""
        return total - len(self.moe_layers) * (self.num_experts - self.top_k) * self.expert_params


@dataclass(frozen=True)
class LayerPlan:
    experts: np.ndarray  # int64 [N, expert_size]; PAD marks a zero neuron
    router: torch.Tensor  # float32 [N, hidden]
    scale: float
    shared: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # int64 [shared_size]
    # bool [N, expert_size]: slots whose neuron is re-initialised at export (drop-upcycling), not copied
    reinit: np.ndarray | None = None
    # Weights fitted by reconstruction, exported instead of the dense slices: "down" float32 [N, hidden, expert_size]
    # (output scale included), "gate"/"up" [N, expert_size, hidden], and the shared block's "shared_down"
    # [hidden, shared_size] (as computed, before Qwen2-MoE's doubling), "shared_gate"/"shared_up" [shared_size, hidden].
    # Held during a build only (in memory, or spilled to disk as tensor_io.SavedTensors); a loaded plan has None
    # here and the keys in PlanMeta.fitted, since the weights are in the checkpoint.
    fitted: Mapping[str, torch.Tensor] | None = None

    @property
    def expert_sizes(self) -> np.ndarray:
        """Each expert's real neurons, without its zero padding."""
        return (self.experts != PAD).sum(1)

    @property
    def shared_neurons(self) -> np.ndarray:
        """The shared block's real neurons, in slot order (a layer with fewer than shared_size is PAD-filled)."""
        return self.shared[self.shared != PAD]


@dataclass(frozen=True)
class MoEPlan:
    meta: PlanMeta
    layers: dict[int, LayerPlan]

    def validate(self) -> None:
        m = self.meta
        if sorted(self.layers) != sorted(m.moe_layers) or len(m.scales) != len(m.moe_layers) or \
                not set(m.fitted) <= set(m.moe_layers):
            raise MoefyError("invalid plan: the layers listed do not match the layer data")
        if not 1 <= m.top_k <= m.num_experts:
            raise MoefyError(f"invalid plan: top_k={m.top_k} with {m.num_experts} experts")
        for i, lp in self.layers.items():
            idx = lp.experts
            if idx.shape != (m.num_experts, m.expert_size):
                raise MoefyError(f"invalid plan: layer {i} experts have shape {tuple(idx.shape)}, "
                                 f"expected ({m.num_experts}, {m.expert_size})")
            if idx.min() < PAD or idx.max() >= m.ffn_width:
                raise MoefyError(f"invalid plan: layer {i} has neuron indices outside [0, {m.ffn_width})")
            if tuple(lp.router.shape) != (m.num_experts, m.hidden_size) or not torch.isfinite(lp.router).all():
                raise MoefyError(f"invalid plan: layer {i} router must be a finite "
                                 f"({m.num_experts}, {m.hidden_size}) matrix")
            if lp.shared.shape != (m.shared_size,) or lp.shared.max(initial=PAD) >= m.ffn_width \
                    or lp.shared.min(initial=PAD) < PAD:
                raise MoefyError(f"invalid plan: layer {i} shared neurons must be {m.shared_size} indices "
                                 f"in [0, {m.ffn_width})")
            for e, row in enumerate([*idx, lp.shared]):
                real = row[row != PAD]
                if len(np.unique(real)) != len(real):
                    raise MoefyError(f"invalid plan: layer {i} expert {e} lists a neuron twice")
            if lp.reinit is not None and (lp.reinit.shape != idx.shape or m.coverage != "overlap"):
                raise MoefyError(f"invalid plan: layer {i} re-initialised neurons need overlapping experts "
                                 f"and a mask of shape {idx.shape}")
            want = {"down": (m.num_experts, m.hidden_size, m.expert_size),
                    "gate": (m.num_experts, m.expert_size, m.hidden_size),
                    "up": (m.num_experts, m.expert_size, m.hidden_size),
                    "shared_down": (m.hidden_size, m.shared_size),
                    "shared_gate": (m.shared_size, m.hidden_size), "shared_up": (m.shared_size, m.hidden_size)}
            if not set(m.fitted.get(i, [])) <= set(want):
                raise MoefyError(f"invalid plan: layer {i} lists unknown fitted weights {m.fitted[i]}")
            if lp.fitted is not None:
                for key, tensor in lp.fitted.items():
                    if key not in want or tuple(tensor.shape) != want[key] or not torch.isfinite(tensor).all():
                        raise MoefyError(f"invalid plan: layer {i} fitted {key!r} must be a finite "
                                         f"{want.get(key, 'known')} tensor")
            used = np.concatenate([idx.ravel(), lp.shared])
            counts = np.bincount(used[used != PAD], minlength=m.ffn_width)
            if m.coverage == "partition" and not (counts == 1).all():
                raise MoefyError(f"invalid plan: layer {i} does not put every neuron in exactly one expert "
                                 f"({int((counts == 0).sum())} missing, {int((counts > 1).sum())} repeated)")

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        fitted = {i: sorted(lp.fitted) for i, lp in self.layers.items() if lp.fitted is not None}
        meta = self.meta.model_copy(update={"fitted": {**self.meta.fitted, **fitted}})
        (directory / PLAN_JSON).write_text(meta.model_dump_json(indent=2))
        tensors = {}
        for i, lp in self.layers.items():
            tensors[f"layers.{i}.experts"] = torch.from_numpy(np.ascontiguousarray(lp.experts, dtype=np.int64))
            tensors[f"layers.{i}.router"] = lp.router.to(torch.float32).contiguous()
            tensors[f"layers.{i}.shared"] = torch.from_numpy(np.ascontiguousarray(lp.shared, dtype=np.int64))
            if lp.reinit is not None:
                tensors[f"layers.{i}.reinit"] = torch.from_numpy(lp.reinit.astype(np.uint8))
        save_file(tensors, str(directory / PLAN_TENSORS), metadata={"format": "moefy-plan"})


def load_plan(directory: Path) -> MoEPlan:
    directory = Path(directory)
    meta_path, tensor_path = directory / PLAN_JSON, directory / PLAN_TENSORS
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise MoefyError(f"{directory} has no {p.name}: was it written by moefy build?")
    try:
        meta = PlanMeta.model_validate_json(meta_path.read_text())
        tensors = load_file(str(tensor_path))
        if not meta.fitted:  # a plan written before fitted weights stopped being copied into it: list them
            keys = [k.split(".") for k in tensors if ".fitted." in k]  # layers.{i}.fitted.{key}
            fitted: dict[int, list[str]] = {}
            for _, layer, _, key in keys:
                fitted.setdefault(int(layer), []).append(key)
            meta = meta.model_copy(update={"fitted": {i: sorted(v) for i, v in fitted.items()}})
    except (ValidationError, SafetensorError, ValueError, OSError) as exc:
        raise MoefyError(f"corrupt plan in {directory}: {str(exc).splitlines()[0]}") from exc
    try:
        layers = {i: LayerPlan(tensors[f"layers.{i}.experts"].numpy(), tensors[f"layers.{i}.router"], s,
                               tensors[f"layers.{i}.shared"].numpy(),
                               tensors[f"layers.{i}.reinit"].numpy().astype(bool)
                               if f"layers.{i}.reinit" in tensors else None)
                  for i, s in zip(meta.moe_layers, meta.scales)}
    except KeyError as exc:
        raise MoefyError(f"corrupt plan in {directory}: missing tensor {exc}") from exc
    plan = MoEPlan(meta, layers)
    plan.validate()
    return plan


# transformers' grouped_mm experts kernel needs 16-byte aligned rows (8 neurons at bf16/fp16); an expert of
# 13 neurons fails there with "strides should be multiple of 16 bytes". Zero-neuron padding is exact.
EXPERT_SIZE_MULTIPLE = 8


def expert_size_for(width: int, experts: int) -> int:
    """Neurons per expert: the largest balanced slice, rounded up to EXPERT_SIZE_MULTIPLE."""
    largest = -(-width // experts)
    return -(-largest // EXPERT_SIZE_MULTIPLE) * EXPERT_SIZE_MULTIPLE


def balanced_sizes(width: int, parts: int) -> list[int]:
    """Sizes that differ by at most one and sum to width (the first width % parts get one more)."""
    base, extra = divmod(width, parts)
    return [base + (1 if e < extra else 0) for e in range(parts)]


def pad_to(group: np.ndarray, size: int) -> np.ndarray:
    """One neuron group as exactly `size` sorted indices, PAD-filled."""
    out = np.full(size, PAD, dtype=np.int64)
    out[: len(group)] = np.sort(group)
    return out


def pad_groups(groups: list[np.ndarray], size: int) -> np.ndarray:
    """Stack neuron groups into [N, size], filling short experts with PAD (exact zero neurons)."""
    return np.stack([pad_to(g, size) for g in groups]) if groups else np.zeros((0, size), dtype=np.int64)
