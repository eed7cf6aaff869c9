"""Inference speed of an MoE against its dense source in transformers, on any device: the server-side half of the
speed question (llama.cpp's half is bench_gguf / bench_frontier). Builds `random` MoEs of a checkpoint at several
granularities, all at 25% of FFN neurons active, and times each against dense in the same run, interleaved
(moefy.evaluate.speed.measure). Random expert weights time like fitted ones: the kernels do not look at the values.

    python bench/make_shape.py 1b --out /tmp/s1
    python bench/bench_speed.py /tmp/s1 --device cuda      # bf16 on a GPU, fp32 on the CPU (models.inference_dtype)

Run it alone. Prints one markdown table; the rows go in docs/benchmarks.md by hand with the device they ran on."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from moefy import api
from moefy.construct.recipe import BuildRecipe
from moefy.evaluate.speed import measure
from moefy.models import inference_dtype, load_causal_lm
from moefy.recipes import validate_recipe

# (experts, top_k): each keeps a quarter of the FFN neurons active per token
SPLITS = [(8, 2), (16, 4), (32, 8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new", type=int, default=64, help="greedy tokens generated from a 32-token prompt, batch 1")
    ap.add_argument("--work", type=Path, help="where the MoE builds go (default: a temp dir, removed after)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = inference_dtype(device)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        models = {"dense": load_causal_lm(args.model, dtype).to(device)}
        for experts, top_k in SPLITS:
            out = Path(tmp) / f"moe-{experts}"
            api.build(validate_recipe(BuildRecipe, {"model": str(args.model), "method": "random", "experts": experts,
                                                    "top_k": top_k}), out)
            models[f"{experts} experts, top-{top_k}"] = load_causal_lm(out, dtype).to(device)
        vocab = models["dense"].config.vocab_size
        probe = torch.randint(0, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
        speed = measure(models, probe.to(device), new_tokens=args.new)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{args.model}, {name}, {dtype}, prompt {args.batch} × {args.prompt}, generation {args.new} (batch 1)\n")
    print("| model | active ÷ total FFN+attn params | prompt tok/s ÷ dense | prefill tok/s ÷ dense "
          "| generation tok/s ÷ dense |")
    print("|---|---|---|---|---|")
    base = speed["dense"]
    for label, s in speed.items():
        print(f"| {label} | {s.active_params / s.total_params:.2f} | "
              f"{s.forward_tokens_per_s / base.forward_tokens_per_s:.2f}× | "
              f"{s.prefill_tokens_per_s / base.prefill_tokens_per_s:.2f}× | "
              f"{s.generate_tokens_per_s / base.generate_tokens_per_s:.2f}× |")
    print(f"\ndense: {base.forward_tokens_per_s:.0f} prompt tok/s (every position's logits), "
          f"{base.prefill_tokens_per_s:.0f} prefill tok/s (the last one's), {base.generate_tokens_per_s:.1f} "
          "generated tok/s")


if __name__ == "__main__":
    main()
