"""`moefy export-gguf`: a moefy output (or any dense LLaMA) as a GGUF that llama.cpp computes the same function from.

Mixtral and dense LLaMA directories go to llama.cpp's converter as they are. A Qwen2-MoE output does not: llama.cpp's
qwen2moe graph never renormalises the top-k weights (transformers does, with norm_topk_prob), computes the shared
expert's sigmoid as silu(x)/x (0/0 at our all-zero gate), and requires an untied lm_head. So it is first restated,
exactly, as GraniteMoeShared: the same LLaMA attention, Mixtral's top-k-then-softmax gate, and an ungated shared
expert. transformers, vLLM and llama.cpp (arch `granitemoe`) all read that class the same way. The restatement is
streamed one layer at a time into a temp dir; the tests load it in transformers and compare logits."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from moefy.construct.plan import PlanMeta
from moefy.construct.registry import RESIZABLE
from moefy.errors import MoefyError
from moefy.sources import read_config
from moefy.tensor_io import LazyCheckpoint
from moefy.tensor_writer import SHARD_BYTES, ShardedWriter, TensorSpec

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2_moe": "granitemoe"}
# Granite's multipliers that make it plain LLaMA (the attention one is the usual 1/sqrt(head_dim), set per model).
_GRANITE_IDENTITY = {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0}
_COPIED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta",
           "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "dtype")
# llama.cpp's K-quant block (QK_K): a row whose width is not a multiple of it cannot be a K-quant
K_QUANT_BLOCK = 256
# A shared gate (or q/k/v bias) below this is zero: the restatement assumes sigmoid(gate·x) = 1/2 for every token.
_ZERO_TOL = 1e-6


@dataclass(frozen=True)
class GgufSummary:
    path: Path
    architecture: str
    tensors: int
    experts: int | None
    experts_used: int | None
    size_bytes: int
    outtype: str
    # ggml type -> tensors: a quantized outtype keeps some tensors in other types (norms in f32; rows whose width is
    # not a multiple of a K-quant's 256 in q5_0, q8_0 or f16), which users should see
    tensor_types: dict[str, int]
    # expert tensors llama.cpp's CPU backend runs without its tiled MoE kernel, as {row width: tensors}: it tiles expert
    # matmuls (mul_mat_id) only for K-quant and IQ types (pinned llama.cpp, ggml-cpu/tiled/tiled.cpp), and other
    # expert types run one dot product per row and token, which is why MoE prompts ran slower than dense in f16 and
    # faster in K-quants (docs/results.md, llama-cpp-shapes)
    untiled_experts: dict[int, int]


def _refuse(reason: str) -> MoefyError:
    return MoefyError(f"cannot export this Qwen2-MoE output to GGUF exactly: {reason}")


def _granite_refusal(qwen: dict[str, Any]) -> str | None:
    """Why a Qwen2-MoE config has no exact GraniteMoeShared equivalent, or None."""
    if qwen.get("mlp_only_layers") or qwen.get("decoder_sparse_step", 1) != 1:
        return ("some layers are kept dense, and GraniteMoeShared makes every layer MoE "
                "(rebuild with all layers converted, or export Mixtral)")
    if not qwen.get("norm_topk_prob", False):
        return "norm_topk_prob is false; moefy writes true (Mixtral's gate), so this is not a moefy output"
    if qwen.get("use_sliding_window"):
        return "sliding-window attention"
    heads, head_dim = qwen["num_attention_heads"], _head_dim(qwen)
    if head_dim * heads != qwen["hidden_size"]:
        return f"head_dim {head_dim} × {heads} heads != hidden_size {qwen['hidden_size']}, which Granite assumes"
    return None


def _head_dim(qwen: dict[str, Any]) -> int:
    return qwen.get("head_dim") or qwen["hidden_size"] // qwen["num_attention_heads"]


def exportable(config: dict[str, Any]) -> bool:
    """Whether export-gguf takes a model with this config (its config-level checks; the build's card asks, so it
    offers the GGUF route only where export-gguf would not refuse)."""
    model_type = config.get("model_type")
    return model_type in GGUF_ARCH and (model_type != "qwen2_moe" or _granite_refusal(config) is None)


def granite_config(qwen: dict[str, Any]) -> dict[str, Any]:
    """The GraniteMoeShared config that computes what a moefy Qwen2-MoE config does, or a refusal."""
    reason = _granite_refusal(qwen)
    if reason:
        raise _refuse(reason)
    return {"architectures": ["GraniteMoeSharedForCausalLM"], "model_type": "granitemoeshared",
            **{k: qwen[k] for k in _COPIED if k in qwen}, "hidden_act": "silu", "attention_bias": False,
            "intermediate_size": qwen["moe_intermediate_size"], "num_local_experts": qwen["num_experts"],
            "num_experts_per_tok": qwen["num_experts_per_tok"],
            "shared_intermediate_size": qwen["shared_expert_intermediate_size"],
            "attention_multiplier": _head_dim(qwen) ** -0.5, **_GRANITE_IDENTITY, "output_router_logits": False}


def _granite_layer(ck: LazyCheckpoint, i: int, experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    q, g = f"model.layers.{i}.mlp.", f"model.layers.{i}."
    gate = ck.get(q + "shared_expert_gate.weight")
    if gate.abs().max() > _ZERO_TOL:
        raise _refuse(f"layer {i}'s shared_expert_gate is not zero (was it trained?), so its shared expert is "
                      "scaled per token, which no ungated shared expert reproduces")
    yield g + "block_sparse_moe.router.layer.weight", ck.get(q + "gate.weight")
    # JetMoE-style fused experts: input_linear = [gate; up] per expert, as Granite (and its GGUF converter) expect.
    yield g + "block_sparse_moe.input_linear.weight", torch.stack([
        torch.cat([ck.get(f"{q}experts.{e}.gate_proj.weight"), ck.get(f"{q}experts.{e}.up_proj.weight")])
        for e in range(experts)])
    yield g + "block_sparse_moe.output_linear.weight", torch.stack(
        [ck.get(f"{q}experts.{e}.down_proj.weight") for e in range(experts)])
    yield g + "shared_mlp.input_linear.weight", torch.cat(
        [ck.get(q + "shared_expert.gate_proj.weight"), ck.get(q + "shared_expert.up_proj.weight")])
    # sigmoid(0) = 1/2 multiplied the shared expert in Qwen2-MoE; Granite's shared expert is ungated.
    yield g + "shared_mlp.output_linear.weight", ck.get(q + "shared_expert.down_proj.weight") * 0.5


_QKV_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias")  # Qwen2-MoE has them (moefy writes zeros); Granite not


def _is_qwen_moe_key(name: str) -> bool:
    return ".mlp." in name or name.endswith(_QKV_BIASES)


def restate_as_granite(qwen_dir: Path, out: Path) -> None:
    """Write the GraniteMoeShared equivalent of a moefy Qwen2-MoE directory into `out` (which exists)."""
    config = read_config(qwen_dir)
    granite = granite_config(config)
    ck = LazyCheckpoint(qwen_dir)
    for name in ck.names():
        if name.endswith(_QKV_BIASES) and ck.get(name).abs().max() > _ZERO_TOL:
            raise _refuse(f"{name} is not zero, and Granite's attention has no q/k/v biases")
    kept = [n for n in ck.names() if not _is_qwen_moe_key(n)]
    layers = config["num_hidden_layers"]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from ((n, ck.get(n)) for n in kept)
        for i in range(layers):
            yield from _granite_layer(ck, i, config["num_experts"])

    specs = [TensorSpec(n, ck.shape(n), ck.dtype(n)) for n in kept]
    e, h = config["num_experts"], config["hidden_size"]
    s, ss = config["moe_intermediate_size"], config["shared_expert_intermediate_size"]
    for i in range(layers):  # shapes from the config, the dtype from the layer's router: no weights read here
        dt = ck.dtype(f"model.layers.{i}.mlp.gate.weight")
        specs += [TensorSpec(f"model.layers.{i}.block_sparse_moe.router.layer.weight", (e, h), dt),
                  TensorSpec(f"model.layers.{i}.block_sparse_moe.input_linear.weight", (e, 2 * s, h), dt),
                  TensorSpec(f"model.layers.{i}.block_sparse_moe.output_linear.weight", (e, h, s), dt),
                  TensorSpec(f"model.layers.{i}.shared_mlp.input_linear.weight", (2 * ss, h), dt),
                  TensorSpec(f"model.layers.{i}.shared_mlp.output_linear.weight", (h, ss), dt)]
    writer = ShardedWriter(out, specs, max_bytes=SHARD_BYTES)
    for name, tensor in tensors():
        writer.write(name, tensor)
    writer.close()
    (out / "config.json").write_text(json.dumps(granite, indent=2))
    _link_side_files(qwen_dir, out, weights=False)


def _link_side_files(src: Path, out: Path, weights: bool) -> None:
    """Tokenizer and generation config (and, with `weights`, the model's safetensors) as symlinks. moefy's own plan
    tensors stay out: the converter would take any extra .safetensors file for model weights."""
    for f in src.iterdir():
        is_weights = f.name.startswith("model") and (f.suffix == ".safetensors" or f.name.endswith(".index.json"))
        if not f.is_file() or f.name.startswith("moefy_plan") or (out / f.name).exists():
            continue
        if is_weights == weights or not (is_weights or f.suffix == ".safetensors"):
            os.symlink(f.resolve(), out / f.name)


def stage(model_dir: Path, into: Path) -> str:
    """A directory llama.cpp's converter reads as the same model; returns the GGUF architecture it becomes."""
    model_type = read_config(model_dir).get("model_type")
    if model_type not in GGUF_ARCH:
        raise MoefyError(f"export-gguf handles {', '.join(GGUF_ARCH)} directories, not {model_type!r}")
    into.mkdir(parents=True, exist_ok=True)
    if model_type == "qwen2_moe":
        restate_as_granite(model_dir, into)
    else:
        _link_side_files(model_dir, into, weights=True)
    return GGUF_ARCH[model_type]


def gguf_field(reader, key: str) -> str | int | None:
    """A string or integer metadata field of a gguf.GGUFReader, or None when the file lacks it."""
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    return bytes(value).decode() if value.dtype.kind == "u" and value.dtype.itemsize == 1 else int(value[0])


def summarize(path: Path, outtype: str) -> GgufSummary:
    """What a GGUF holds, read back with the gguf library (the structural check CI runs without llama.cpp)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = gguf_field(reader, "general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    # a tensor's shape lists its dims innermost first: shape[0] is the row width a quantized block runs along
    untiled = Counter(int(t.shape[0]) for t in reader.tensors if "_exps." in t.name and not _tiled(t.tensor_type.name))
    return GgufSummary(path, arch, len(reader.tensors), gguf_field(reader, f"{arch}.expert_count"),
                       gguf_field(reader, f"{arch}.expert_used_count"), path.stat().st_size, outtype,
                       dict(types.most_common()), dict(sorted(untiled.items())))


def _tiled(ggml_type: str) -> bool:
    """Whether llama.cpp's tiled MoE kernel takes experts of this ggml type: the K-quants (Q4_K, Q6_K, ...) and IQ."""
    return ggml_type.endswith("_K") or ggml_type.startswith("IQ")


@dataclass(frozen=True)
class TiledSplit:
    """A split of the same FFN whose experts are multiples of K_QUANT_BLOCK wide, as `moefy build` flags."""
    experts: int
    top_k: int
    shared: int  # always-on neurons
    expert_size: int
    active: float  # neurons computed per token ÷ FFN width

    def shared_fraction(self, ffn_width: int) -> float:
        # six significant digits, short enough to type: carve rounds width × fraction, which gives back exactly
        # `shared` for any FFN narrower than 500,000 neurons
        return float(f"{self.shared / ffn_width:.6g}")

    def flags(self, ffn_width: int, shared_block: bool) -> str:
        flags = f"--experts {self.experts} --top-k {self.top_k}"
        return flags + (f" --shared-fraction {self.shared_fraction(ffn_width):g}" if shared_block else "")


def tiled_split(meta: PlanMeta, active: float) -> TiledSplit | None:
    """The split nearest to this plan's whose every expert tensor a K-quant GGUF can hold, or None when the plan's
    experts already are, or when no flags can make them (a hidden size that is not a multiple of 256 keeps the gate
    and up rows untiled whatever the split; only the RESIZABLE methods take any expert count).

    Nearest means: the active fraction first, then the shared block's share, then the expert width."""
    if meta.expert_size % K_QUANT_BLOCK == 0 or meta.hidden_size % K_QUANT_BLOCK or meta.method not in RESIZABLE:
        return None
    width, shared_block = meta.ffn_width, meta.shared_size > 0
    best, best_key = None, None
    for size in range(K_QUANT_BLOCK, width + 1, K_QUANT_BLOCK):
        for experts in range(2, width // size + 1):
            shared = width - experts * size
            if shared and not shared_block:
                continue
            for k in range(1, experts):
                split = TiledSplit(experts, k, shared, size, (shared + k * size) / width)
                key = (round(abs(split.active - active), 4), abs(shared - meta.shared_size),
                       abs(size - meta.expert_size))
                if best_key is None or key < best_key:
                    best, best_key = split, key
    return best
