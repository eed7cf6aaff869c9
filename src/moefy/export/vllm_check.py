"""Will vLLM load this checkpoint as the function transformers computes? A static check of the config fields and
tensor names that vLLM's MixtralForCausalLM and Qwen2MoeForCausalLM read (vllm/model_executor/models/mixtral.py
and qwen2_moe.py, 2025-2026), without vLLM installed: vLLM needs a GPU, and no test machine of ours has it, so this
static check is what runs everywhere (`moefy verify` reports it).

What vLLM reads differently from transformers, and so what this checks:
- Qwen2-MoE attention always has q/k/v biases (bias=True): a checkpoint without them leaves those parameters
  uninitialised instead of failing. Mixtral's attention has none.
- Qwen2-MoE derives head_dim = hidden_size / num_attention_heads and ignores a config's head_dim.
- Mixtral makes every layer MoE and always renormalises the top-k weights; Qwen2-MoE renormalises only with
  norm_topk_prob, and keeps the layers in mlp_only_layers (and off decoder_sparse_step) dense.
- Experts load from per-expert keys (experts.{e}.w1/w2/w3, or gate/up/down_proj); without tie_word_embeddings the
  lm_head must be there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moefy.sources import read_config
from moefy.tensor_io import LazyCheckpoint

# Per architecture: the config fields vLLM reads without a default, and the tensors of one layer it loads. A
# tensor name is formatted with the layer's prefix, and expert e of the range the config gives.
VLLM_READS: dict[str, dict[str, Any]] = {
    "MixtralForCausalLM": {
        "fields": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "num_local_experts", "num_experts_per_tok", "intermediate_size", "rms_norm_eps",
                   "max_position_embeddings"),
        "experts_field": "num_local_experts",
        "layer": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"),
        "moe_layer": ("block_sparse_moe.gate.weight",),
        "expert": ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w2.weight",
                   "block_sparse_moe.experts.{e}.w3.weight"),
        "dense_layer": (),
        "all_moe": True,  # vLLM's Mixtral makes every layer MoE
        "shared": (),
        "head_dim_from_config": True,
    },
    "Qwen2MoeForCausalLM": {
        "fields": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                   "intermediate_size", "norm_topk_prob", "decoder_sparse_step", "rms_norm_eps", "hidden_act"),
        "experts_field": "num_experts",
        "layer": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                  "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"),
        "moe_layer": ("mlp.gate.weight", "mlp.shared_expert_gate.weight"),
        "expert": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                   "mlp.experts.{e}.down_proj.weight"),
        "dense_layer": ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"),
        "shared": ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                   "mlp.shared_expert.down_proj.weight"),
        "all_moe": False,  # layers in mlp_only_layers, or off decoder_sparse_step, stay dense
        "head_dim_from_config": False,
    },
}


def _moe_layers(reads: dict[str, Any], config: dict[str, Any]) -> set[int]:
    n = config["num_hidden_layers"]
    if reads["all_moe"]:
        return set(range(n))
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or ())
    return {i for i in range(n) if i not in dense and config[reads["experts_field"]] > 0 and (i + 1) % step == 0}


def vllm_problems(directory: Path) -> list[str]:
    """What would stop vLLM from computing this checkpoint's function; [] when nothing does."""
    config = read_config(directory)
    arch = (config.get("architectures") or [None])[0]
    reads = VLLM_READS.get(arch)
    if reads is None:
        return [f"architecture {arch!r} is not one moefy checks for vLLM ({', '.join(VLLM_READS)})"]
    problems = [f"config has no {f}" for f in reads["fields"] if f not in config]
    if problems:
        return problems
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if not reads["head_dim_from_config"] and config.get("head_dim", hidden // heads) != hidden // heads:
        problems.append(f"head_dim {config['head_dim']} differs from hidden_size / num_attention_heads = "
                        f"{hidden // heads}, which vLLM's {arch} uses instead")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r}: vLLM's {arch} supports silu only")
    names = set(LazyCheckpoint(Path(directory)).names())
    wanted = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.get("tie_word_embeddings", False):
        wanted.append("lm_head.weight")
    moe = _moe_layers(reads, config)
    shared = reads["shared"] if config.get("shared_expert_intermediate_size", 0) > 0 else ()
    for i in range(config["num_hidden_layers"]):
        per_layer = [*reads["layer"], *(reads["moe_layer"] + shared if i in moe else reads["dense_layer"])]
        if i in moe:
            per_layer += [t.format(e=e) for e in range(config[reads["experts_field"]]) for t in reads["expert"]]
        wanted += [f"model.layers.{i}.{t}" for t in per_layer]
    missing = [t for t in wanted if t not in names]
    if missing:
        problems.append(f"{len(missing)} tensor(s) vLLM loads are missing, e.g. {missing[0]}")
    return problems
