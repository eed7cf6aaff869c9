"""Eval memory benchmark (issue: scale): `moefy eval` of a MoE beside its dense source, perplexity only, on the demo
corpus's held-out domains. A random 8-expert top-2 MoE is built in bf16 from MODEL (a model or a bench/make_shape.py
shape); eval loads both in float32. Reported above the process's memory after imports: the anonymous peak (sampled
every 0.05 s, a lower bound) and peak RSS (exact, but it also counts mapped checkpoint pages), each ÷ the larger
model's float32 size, with the two losses.

Usage: python bench/bench_eval_memory.py [--model .cache/shapes/tinyllama-1b] [--tokens-per-domain 256]"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory_use import AnonPeak, rss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=".cache/shapes/tinyllama-1b")
    p.add_argument("--tokens-per-domain", type=int, default=256)
    args = p.parse_args()

    import accelerate  # noqa: F401  (part of the import floor, not of eval)
    import transformers  # noqa: F401
    from common import cpu_name, demo_corpus

    from moefy import api
    from moefy.construct.recipe import BuildRecipe
    from moefy.sources import resolve_model
    from moefy.tensor_io import LazyCheckpoint

    with tempfile.TemporaryDirectory(prefix="moefy-bench-eval-memory-") as tmp:
        work = Path(tmp)
        heldout = demo_corpus(work) / "heldout"
        moe = work / "moe"
        api.build(BuildRecipe(model=args.model, experts=8, top_k=2, method="random", dtype="bfloat16"), moe)
        dense = resolve_model(args.model).directory

        def float32_size(directory: Path) -> int:
            ck = LazyCheckpoint(directory)
            return 4 * sum(math.prod(ck.shape(n)) for n in ck.names())

        largest = max(float32_size(dense), float32_size(moe))
        floor = rss()
        with AnonPeak(0.05) as sampled:
            result = api.evaluate([str(dense), str(moe)], str(heldout), seq_len=128,
                                  tokens_per_domain=args.tokens_per_domain)
        losses = [round(ppl.overall_loss, 4) for ppl in result.perplexity.values()]
    print(f"model {args.model}; dense + random 8-expert top-2 MoE (bf16 on disk); {cpu_name()}; "
          f"perplexity on the demo held-out domains, {args.tokens_per_domain} tokens each, context 128")
    print("| larger model in float32 | peak anonymous − after imports | ÷ larger model | peak RSS − after imports | "
          "losses (dense, MoE) |")
    print("|---|---|---|---|---|")
    above = sampled.peak - sampled.start
    print(f"| {largest / 2**30:.2f} GiB | {above / 2**30:.2f} GiB | {above / largest:.2f}× | "
          f"{(rss() - floor) / 2**30:.2f} GiB | {losses} |")

if __name__ == "__main__":
    main()
