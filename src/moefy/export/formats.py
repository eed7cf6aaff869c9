"""Output formats as strategies: each maps a plan onto a stock transformers MoE class, says why it refuses a
plan it cannot hold exactly, and knows how to switch a loaded model to 'all experts, uniform router'."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator

import numpy as np
import torch

from moefy.construct.plan import EXPERT_SIZE_MULTIPLE, PAD, LayerPlan, PlanMeta, pad_to
from moefy.errors import MoefyError
from moefy.seeding import derived_seed
from moefy.tensor_writer import TensorSpec

# Attention/embedding facts copied verbatim from the dense config; the MoE classes share LLaMA's attention.
_SHARED_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "initializer_range",
)
Tensors = Iterator[tuple[str, torch.Tensor]]


def gather_neurons(weight: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Slices of `weight` along `dim` at idx; a PAD index yields zeros (a zero neuron contributes exactly 0)."""
    real = idx != PAD
    if bool(real.all()):  # no padding: one gather, no zero fill
        return weight.index_select(dim, idx)
    shape = list(weight.shape)
    shape[dim] = len(idx)
    out = weight.new_zeros(shape)
    out.index_copy_(dim, real.nonzero().squeeze(1), weight.index_select(dim, idx[real]))
    return out


def _reinitialise(w_gate: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, slots: torch.Tensor,
                  seed: tuple[int, int, int]) -> None:
    """Drop-Upcycling: fresh normal weights for the chosen neurons, with each matrix's own mean and std (drawn in
    fp32, stored in the slice's dtype: gate and up come in the checkpoint's, often bf16)."""
    gen = torch.Generator().manual_seed(derived_seed(*seed))
    for w, dim in ((w_gate, 0), (w_up, 0), (w_down, 1)):
        fresh = (torch.randn(w.shape, generator=gen) * w.float().std() + w.float().mean()).to(w.dtype)
        if dim == 0:
            w[slots] = fresh[slots]
        else:
            w[:, slots] = fresh[:, slots]


class OutputFormat(ABC):
    """A stock HF MoE class. Subclasses give the key names and config; the tensor logic is shared."""

    name: str
    architecture: str
    expert_keys: tuple[str, str, str]  # gate, down, up names inside an expert
    dense_ffn_keys = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")

    @abstractmethod
    def refusal(self, meta: PlanMeta, dense: dict[str, Any]) -> str | None:
        """Why this format cannot hold the plan exactly, or None."""

    @abstractmethod
    def config(self, dense: dict[str, Any], meta: PlanMeta, dtype: str) -> dict[str, Any]:
        """The output config.json."""

    @abstractmethod
    def moe_prefix(self, layer: int) -> str:
        """The key prefix of a layer's MoE block."""

    def shared_size(self, meta: PlanMeta) -> int:
        return 0

    def layer_extras(self, layer: int, dense: dict[str, Any]) -> list[TensorSpec]:
        """Tensors the MoE class has but the dense family lacks (all zero, so they change nothing)."""
        return []

    # -- shared by every format --
    def ffn_specs(self, layer: int, meta: PlanMeta, dtype: torch.dtype) -> list[TensorSpec]:
        h = meta.hidden_size
        if layer not in meta.moe_layers:
            w = meta.ffn_width
            shapes = {"gate": (w, h), "up": (w, h), "down": (h, w)}
            return [TensorSpec(f"model.layers.{layer}.{k}", shapes[k.split(".")[1].removesuffix("_proj")], dtype)
                    for k in self.dense_ffn_keys]
        p, n, s = self.moe_prefix(layer), meta.num_experts, meta.expert_size
        g, d, u = self.expert_keys
        specs = [TensorSpec(p + "gate.weight", (n, h), dtype)]
        for e in range(n):
            specs += [TensorSpec(f"{p}experts.{e}.{g}", (s, h), dtype), TensorSpec(f"{p}experts.{e}.{d}", (h, s), dtype),
                      TensorSpec(f"{p}experts.{e}.{u}", (s, h), dtype)]
        if self.shared_size(meta):
            ss = self.shared_size(meta)
            specs += [TensorSpec(p + "shared_expert.gate_proj.weight", (ss, h), dtype),
                      TensorSpec(p + "shared_expert.up_proj.weight", (ss, h), dtype),
                      TensorSpec(p + "shared_expert.down_proj.weight", (h, ss), dtype),
                      TensorSpec(p + "shared_expert_gate.weight", (1, h), dtype)]
        return specs

    def ffn_tensors(self, layer: int, meta: PlanMeta, lp: LayerPlan | None, gate: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor) -> Tensors:
        if lp is None:  # a layer kept dense
            yield from zip((f"model.layers.{layer}.{k}" for k in self.dense_ffn_keys), (gate, up, down))
            return
        p = self.moe_prefix(layer)
        g, d, u = self.expert_keys
        fitted = dict(lp.fitted or {})  # this layer's fitted tensors, read once if they were spilled to disk
        yield p + "gate.weight", lp.router
        # down_proj slices are upcast after the gather and scaled in fp32, so a bf16 build rounds each weight once (at
        # the writer's cast) and no fp32 copy of the whole matrix is made (180 MB at a 7B layer, a quarter of a random
        # build's peak above imports); gate and up are only sliced, which is exact in any dtype. Fitted tensors
        # arrive in fp32.
        for e, row in enumerate(torch.from_numpy(lp.experts)):
            w_gate, w_up = gather_neurons(gate, row, 0), gather_neurons(up, row, 0)
            w_down = gather_neurons(down, row, 1).float()
            if lp.reinit is not None and lp.reinit[e].any():
                _reinitialise(w_gate, w_down, w_up, torch.from_numpy(lp.reinit[e]), (meta.seed, layer, e))
            yield f"{p}experts.{e}.{g}", fitted["gate"][e] if "gate" in fitted else w_gate
            yield f"{p}experts.{e}.{d}", fitted["down"][e] if "down" in fitted else w_down.mul_(lp.scale)
            yield f"{p}experts.{e}.{u}", fitted["up"][e] if "up" in fitted else w_up
        if self.shared_size(meta):
            row = torch.from_numpy(pad_to(lp.shared_neurons, self.shared_size(meta)))
            # fitted shared tensors are indexed by the plan's shared slots: its real neurons come first, sorted
            slots = torch.from_numpy(pad_to(np.flatnonzero(lp.shared != PAD), len(row)))

            def shared(key: str, dense: torch.Tensor, dim: int) -> torch.Tensor:
                return gather_neurons(fitted[key], slots, dim) if key in fitted else gather_neurons(dense, row, dim)

            yield p + "shared_expert.gate_proj.weight", shared("shared_gate", gate, 0)
            yield p + "shared_expert.up_proj.weight", shared("shared_up", up, 0)
            # sigmoid(0) = 0.5 from the zero shared gate below; doubling makes the shared block exactly always-on.
            yield p + "shared_expert.down_proj.weight", shared("shared_down", down, 1).float().mul_(2.0)
            yield p + "shared_expert_gate.weight", gate.new_zeros(1, gate.shape[1])

    def all_experts_uniform(self, model: torch.nn.Module, meta: PlanMeta) -> None:
        # With top-k = N and a zero router every expert gets weight 1/N, so the routed block outputs
        # (scale/N)·(its dense part); multiplying each expert's down_proj by N/scale restores it exactly.
        for layer, scale in zip(meta.moe_layers, meta.scales):
            moe = model.model.layers[layer].mlp
            moe.gate.top_k = meta.num_experts
            if hasattr(moe, "top_k"):
                moe.top_k = meta.num_experts
            with torch.no_grad():
                moe.gate.weight.zero_()
                moe.experts.down_proj.mul_(meta.num_experts / scale)

    def _base_config(self, dense: dict[str, Any], meta: PlanMeta, dtype: str) -> dict[str, Any]:
        return {"architectures": [self.architecture], "model_type": self.name,
                **{k: dense[k] for k in _SHARED_CONFIG_KEYS if k in dense},
                "num_experts_per_tok": meta.top_k, "output_router_logits": False, "dtype": dtype}


class MixtralFormat(OutputFormat):
    """Routed experts only -> MixtralForCausalLM, legacy per-expert keys (block_sparse_moe.experts.{e}.w1/w2/w3).

    Mixtral's softmax-over-all, top-k, renormalise gate equals LLaMA-MoE's top-k-then-softmax gate, and the
    N/k output scale folds exactly into w2 (down_proj)."""

    name, architecture = "mixtral", "MixtralForCausalLM"
    expert_keys = ("w1.weight", "w2.weight", "w3.weight")

    def refusal(self, meta: PlanMeta, dense: dict[str, Any]) -> str | None:
        if meta.shared_size:
            return "Mixtral has no always-on shared expert"
        if len(meta.moe_layers) != meta.num_layers:
            return "Mixtral cannot keep some layers dense"
        return None

    def moe_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe."

    def config(self, dense: dict[str, Any], meta: PlanMeta, dtype: str) -> dict[str, Any]:
        # Plain data rather than transformers.MixtralConfig: importing transformers costs more than a small
        # model's whole build, and the tests load every output through the stock class anyway.
        return {**self._base_config(dense, meta, dtype), "sliding_window": dense.get("sliding_window"),
                "intermediate_size": meta.expert_size, "num_local_experts": meta.num_experts,
                "router_jitter_noise": 0.0}


class Qwen2MoeFormat(OutputFormat):
    """Shared (always-on) neurons and/or dense layers -> Qwen2MoeForCausalLM (legacy per-expert keys).

    The shared block is exact: a zero shared_expert_gate gives sigmoid = 0.5 and its down_proj is doubled.
    norm_topk_prob=True makes the routed gate Mixtral's. Dense layers are listed in mlp_only_layers. q/k/v get zero
    biases (qkv_bias=true), which older consumers that always expect them also load."""

    name, architecture = "qwen2_moe", "Qwen2MoeForCausalLM"
    expert_keys = ("gate_proj.weight", "down_proj.weight", "up_proj.weight")

    def refusal(self, meta: PlanMeta, dense: dict[str, Any]) -> str | None:
        if dense.get("sliding_window") and dense.get("use_sliding_window", True):
            return "the dense model uses sliding-window attention, which this Qwen2-MoE mapping does not reproduce"
        return None

    def moe_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp."

    def shared_size(self, meta: PlanMeta) -> int:
        # Qwen2-MoE has a shared expert in every MoE layer; with no shared neurons it holds zero neurons only.
        return max(meta.shared_size, EXPERT_SIZE_MULTIPLE)

    def layer_extras(self, layer: int, dense: dict[str, Any]) -> list[TensorSpec]:
        heads, kv = dense["num_attention_heads"], dense.get("num_key_value_heads", dense["num_attention_heads"])
        head_dim = dense.get("head_dim") or dense["hidden_size"] // heads
        p = f"model.layers.{layer}.self_attn."
        return [TensorSpec(p + "q_proj.bias", (heads * head_dim,), torch.float32),
                TensorSpec(p + "k_proj.bias", (kv * head_dim,), torch.float32),
                TensorSpec(p + "v_proj.bias", (kv * head_dim,), torch.float32)]

    def config(self, dense: dict[str, Any], meta: PlanMeta, dtype: str) -> dict[str, Any]:
        dense_layers = [i for i in range(meta.num_layers) if i not in meta.moe_layers]
        return {**self._base_config(dense, meta, dtype), "intermediate_size": meta.ffn_width,
                "moe_intermediate_size": meta.expert_size, "shared_expert_intermediate_size": self.shared_size(meta),
                "num_experts": meta.num_experts, "norm_topk_prob": True, "decoder_sparse_step": 1,
                "mlp_only_layers": dense_layers, "qkv_bias": True, "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": meta.num_layers}


FORMATS: dict[str, OutputFormat] = {f.name: f for f in (MixtralFormat(), Qwen2MoeFormat())}


def choose_format(family_formats: tuple[str, ...], meta: PlanMeta, dense: dict[str, Any]) -> OutputFormat:
    reasons = []
    for name in family_formats:
        reason = FORMATS[name].refusal(meta, dense)
        if reason is None:
            return FORMATS[name]
        reasons.append(f"{name}: {reason}")
    raise MoefyError("no output format can hold this plan exactly (" + "; ".join(reasons) + ")")
