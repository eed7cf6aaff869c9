"""Eval and verify memory benchmark (issue: scale). A random 8-expert top-2 MoE is built in bf16 from MODEL (a model
or a bench/make_shape.py shape; with --method dive, a DIVE build whose 4 experts overlap: each the FFN pruned on one
of the demo corpus's 4 calibration domains, a quarter of it, top-1), then either
- `moefy eval` of it beside its dense source, perplexity only, on the demo corpus's held-out domains, or, with --verify,
- `moefy verify` of it against its dense source: the exactness check, the oracles and the routing margins on the
  probe.
Both compute in float32: each model is upcast once, or, where its float32 copy would take more than half of the
memory free (--free-memory pretends a smaller machine), kept in bf16 and read as float32.
Reported above the process's memory after imports: the anonymous peak (sampled every 0.05 s, a lower bound) and peak
RSS (exact, but it also counts mapped checkpoint pages), each ÷ the larger model's float32 size, with the two losses
(eval: dense and MoE; verify: dense and the MoE as built), for verify its max |Δlogits|, and the wall seconds
of the command (one run: an indication on a shared machine, not a benchmark of speed).

Usage: python bench/bench_eval_memory.py [--model .cache/shapes/tinyllama-1b] [--tokens-per-domain 256] [--verify]
                                       [--free-memory GIB] [--method random|dive]"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory_use import AnonPeak, rss  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=".cache/shapes/tinyllama-1b")
    p.add_argument("--tokens-per-domain", type=int, default=256)
    p.add_argument("--verify", action="store_true", help="measure moefy verify instead of moefy eval")
    p.add_argument("--free-memory", type=float, help="GiB: run as on a machine with this much memory free, which "
                   "decides whether a model is upcast to float32 once or kept as stored (models.load_in_float32)")
    p.add_argument("--method", choices=["random", "dive"], default="random",
                   help="dive: experts that overlap, which verify checks per expert (export/verify.py)")
    args = p.parse_args()

    import accelerate  # noqa: F401  (part of the import floor, not of eval)
    import transformers  # noqa: F401
    from common import cpu_name, demo_corpus

    from moefy import api, models
    from moefy.construct.recipe import BuildRecipe
    from moefy.sources import resolve_model
    from moefy.tensor_io import LazyCheckpoint

    if args.free_memory is not None:
        models.free_memory = lambda device: int(args.free_memory * 2**30)
    with tempfile.TemporaryDirectory(prefix="moefy-bench-eval-memory-") as tmp:
        work = Path(tmp)
        corpus = demo_corpus(work)
        heldout = None if args.verify else corpus / "heldout"
        moe = work / "moe"
        if args.method == "dive":  # a small calibration and the IoU affinity: the build is not what is measured
            recipe = BuildRecipe(model=args.model, experts=4, top_k=1, method="dive", dtype="bfloat16",
                                 calib=str(corpus / "calib"), profile={"tokens_per_domain": 256, "sample_tokens": 256},
                                 dive={"affinity": "iou", "affinity_tokens_per_domain": 64})
        else:
            recipe = BuildRecipe(model=args.model, experts=8, top_k=2, method="random", dtype="bfloat16")
        api.build(recipe, moe)
        dense = resolve_model(args.model).directory

        def float32_size(directory: Path) -> int:
            ck = LazyCheckpoint(directory)
            return 4 * sum(math.prod(ck.shape(n)) for n in ck.names())

        largest = max(float32_size(dense), float32_size(moe))
        floor = rss()
        start = time.perf_counter()
        with AnonPeak(0.05) as sampled:
            if args.verify:
                report = api.verify(moe, str(dense))
                losses = [round(report.dense_loss, 4), round(report.built_moe_loss, 4)]
            else:
                result = api.evaluate([str(dense), str(moe)], str(heldout), seq_len=128,
                                      tokens_per_domain=args.tokens_per_domain)
                losses = [round(ppl.overall_loss, 4) for ppl in result.perplexity.values()]
        seconds = time.perf_counter() - start
    if args.verify:
        what, extra = "moefy verify on its probe", f" {report.max_abs_dlogits:.2e} |"
    else:
        what = f"perplexity on the demo held-out domains, {args.tokens_per_domain} tokens each, context 128"
        extra = ""
    free = "" if args.free_memory is None else f"; as with {args.free_memory:g} GiB free"
    built = ("DIVE 4-expert top-1 MoE, each expert a quarter of the FFN" if args.method == "dive"
             else "random 8-expert top-2 MoE")
    print(f"model {args.model}; dense + {built} (bf16 on disk); {cpu_name()}; {what}{free}")
    print("| larger model in float32 | peak anonymous − after imports | ÷ larger model | peak RSS − after imports | "
          "losses (dense, MoE) |" + (" max \\|Δlogits\\| |" if args.verify else "") + " seconds |")
    print("|---|---|---|---|---|" + ("---|" if args.verify else "") + "---|")
    above = sampled.peak - sampled.start
    print(f"| {largest / 2**30:.2f} GiB | {above / 2**30:.2f} GiB | {above / largest:.2f}× | "
          f"{(rss() - floor) / 2**30:.2f} GiB | {losses} |{extra} {seconds:.0f} |")


if __name__ == "__main__":
    main()
