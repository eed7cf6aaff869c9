"""Write a random-weight LLaMA checkpoint with a real model's shapes, for the scale benchmarks (never for git):
bf16, sharded safetensors of at most 5 GB, streamed one tensor at a time, seeded.

    python bench/make_shape.py 7b   [--out .cache/shapes/llama2-7b]     # LLaMA-2-7B: 32 × (4096, 11008), ~13.5 GB
    python bench/make_shape.py 1b   [--out .cache/shapes/tinyllama-1b]  # TinyLlama-1.1B (DIVE's model), ~2.2 GB
    python bench/make_shape.py 7b --layers 8 --out /tmp/s7-8   # the 7B layer shape, 8 of them: per-layer figures
                                                                # in a quarter of the write and the run

Weights are N(0, 0.02): right for timing and memory, meaningless for quality. The tokenizer is byte-level (257 ids),
enough to feed calibration text to the data-driven methods."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moefy.tensor_writer import ShardedWriter, TensorSpec

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}
DEFAULT_OUT = {"7b": ".cache/shapes/llama2-7b", "1b": ".cache/shapes/tinyllama-1b"}


def save_byte_tokenizer(directory: Path) -> int:
    """A 256-symbol byte-level tokenizer plus <eos>; returns the vocab size it needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # sorted: alphabet() comes out of a hash set, in a different order in every process, which gave every tiny test
    # model a different byte-to-id map (and every test run different numbers)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(directory)
    return len(vocab)


def specs(c: dict) -> list[TensorSpec]:
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    bf = torch.bfloat16
    out = [TensorSpec("model.embed_tokens.weight", (v, h), bf)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [TensorSpec(p + "input_layernorm.weight", (h,), bf),
                TensorSpec(p + "self_attn.q_proj.weight", (h, h), bf),
                TensorSpec(p + "self_attn.k_proj.weight", (kv, h), bf),
                TensorSpec(p + "self_attn.v_proj.weight", (kv, h), bf),
                TensorSpec(p + "self_attn.o_proj.weight", (h, h), bf),
                TensorSpec(p + "post_attention_layernorm.weight", (h,), bf),
                TensorSpec(p + "mlp.gate_proj.weight", (f, h), bf),
                TensorSpec(p + "mlp.up_proj.weight", (f, h), bf),
                TensorSpec(p + "mlp.down_proj.weight", (h, f), bf)]
    return out + [TensorSpec("model.norm.weight", (h,), bf), TensorSpec("lm_head.weight", (v, h), bf)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="decoder layers (default: the real model's)")
    args = ap.parse_args()
    out = args.out or Path(DEFAULT_OUT[args.shape])
    if (out / "config.json").is_file():
        sys.exit(f"{out} exists; remove it first")
    shape = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
    all_specs, files = write_checkpoint(out, shape, args.seed)
    save_byte_tokenizer(out)
    print(f"{out}: {sum(s.nbytes for s in all_specs) / 1e9:.1f} GB in {len(files)} shards")


def write_checkpoint(out: Path, shape: dict, seed: int = 0) -> tuple[list[TensorSpec], list[str]]:
    """A LlamaForCausalLM of `shape` (SHAPES' fields) with N(0, 0.02) weights in `out`, without a tokenizer: its
    (tensor specs, shard files)."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2, "dtype": "bfloat16", **shape}
    gen = torch.Generator().manual_seed(seed)
    all_specs = specs(config)
    writer = ShardedWriter(out, all_specs, max_bytes=5 * 10**9)
    for s in all_specs:
        t = torch.ones(s.shape) if len(s.shape) == 1 else torch.randn(s.shape, generator=gen).mul_(0.02)
        writer.write(s.name, t.to(s.dtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return all_specs, writer.files


if __name__ == "__main__":
    main()
