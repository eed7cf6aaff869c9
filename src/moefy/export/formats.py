"""Output formats as strategies: each maps a plan onto a stock transformers MoE class, says why it refuses a
plan it cannot hold exactly, and knows how to switch a loaded model to 'all experts, uniform router'."""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch

from moefy.construct.plan import PAD, LayerPlan, PlanMeta
from moefy.errors import MoefyError
from moefy.export.writer import TensorSpec

# Attention/embedding facts copied verbatim from the dense config; the MoE classes share LLaMA's attention.
_SHARED_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "sliding_window",
    "initializer_range",
)


def gather_neurons(weight: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Slices of `weight` along `dim` at idx; a PAD index yields zeros (a zero neuron contributes exactly 0)."""
    real = idx != PAD
    shape = list(weight.shape)
    shape[dim] = len(idx)
    out = weight.new_zeros(shape)
    out.index_copy_(dim, real.nonzero().squeeze(1), weight.index_select(dim, idx[real]))
    return out


class OutputFormat(Protocol):
    name: str

    def refusal(self, meta: PlanMeta) -> str | None: ...
    def config(self, dense: dict[str, Any], meta: PlanMeta, dtype: str) -> dict[str, Any]: ...
    def ffn_specs(self, layer: int, meta: PlanMeta, dtype: torch.dtype) -> list[TensorSpec]: ...
    def ffn_tensors(self, layer: int, lp: LayerPlan, gate: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]: ...
    def all_experts_uniform(self, model: torch.nn.Module, meta: PlanMeta) -> None: ...


class MixtralFormat:
    """Routed experts only -> MixtralForCausalLM, legacy per-expert keys (block_sparse_moe.experts.{e}.w1/w2/w3).

    Mixtral's softmax-over-all, top-k, renormalise gate equals LLaMA-MoE's top-k-then-softmax gate, and the
    N/k output scale folds exactly into w2 (down_proj)."""

    name = "mixtral"

    def refusal(self, meta: PlanMeta) -> str | None:
        if len(meta.moe_layers) != meta.num_layers:
            return "Mixtral cannot keep some layers dense"
        return None

    def config(self, dense: dict[str, Any], meta: PlanMeta, dtype: str) -> dict[str, Any]:
        # Plain data rather than transformers.MixtralConfig: importing transformers costs more than a small
        # model's whole build, and the tests load every output through the stock class anyway.
        config = {k: dense[k] for k in _SHARED_CONFIG_KEYS if k in dense}
        config.setdefault("sliding_window", None)
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **config,
                "intermediate_size": meta.expert_size, "num_local_experts": meta.num_experts,
                "num_experts_per_tok": meta.top_k, "router_jitter_noise": 0.0, "output_router_logits": False,
                "dtype": dtype}

    def _prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe."

    def ffn_specs(self, layer: int, meta: PlanMeta, dtype: torch.dtype) -> list[TensorSpec]:
        p, n, s, h = self._prefix(layer), meta.num_experts, meta.expert_size, meta.hidden_size
        specs = [TensorSpec(p + "gate.weight", (n, h), dtype)]
        for e in range(n):
            specs += [TensorSpec(f"{p}experts.{e}.w1.weight", (s, h), dtype),
                      TensorSpec(f"{p}experts.{e}.w2.weight", (h, s), dtype),
                      TensorSpec(f"{p}experts.{e}.w3.weight", (s, h), dtype)]
        return specs

    def ffn_tensors(self, layer, lp, gate, up, down):
        p = self._prefix(layer)
        yield p + "gate.weight", lp.router
        for e, row in enumerate(torch.from_numpy(lp.experts)):
            yield f"{p}experts.{e}.w1.weight", gather_neurons(gate, row, 0)
            yield f"{p}experts.{e}.w2.weight", gather_neurons(down, row, 1).mul_(lp.scale)
            yield f"{p}experts.{e}.w3.weight", gather_neurons(up, row, 0)

    def all_experts_uniform(self, model: torch.nn.Module, meta: PlanMeta) -> None:
        # With top-k = N and a zero router every expert gets weight 1/N, so the block outputs (scale/N)·dense;
        # multiplying each expert's down_proj by N/scale makes it exactly the dense FFN again.
        for layer, scale in zip(meta.moe_layers, meta.scales):
            moe = model.model.layers[layer].mlp
            moe.top_k = moe.gate.top_k = meta.num_experts
            with torch.no_grad():
                moe.gate.weight.zero_()
                moe.experts.down_proj.mul_(meta.num_experts / scale)


FORMATS: dict[str, OutputFormat] = {"mixtral": MixtralFormat()}


def choose_format(family_formats: tuple[str, ...], meta: PlanMeta) -> OutputFormat:
    reasons = []
    for name in family_formats:
        reason = FORMATS[name].refusal(meta)
        if reason is None:
            return FORMATS[name]
        reasons.append(f"{name}: {reason}")
    raise MoefyError("no output format can hold this plan exactly (" + "; ".join(reasons) + ")")
