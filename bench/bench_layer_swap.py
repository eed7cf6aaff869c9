"""Where a reconstructed build's held-out gap sits by layer (issue: near-lossless conversion): the build as it is,
then the same build with the dense source's FFN put back in one layer at a time, every other layer as built. Each
row is that model's held-out perplexity ÷ dense and the share of the build's log-perplexity gap it closes (negative:
the dense FFN made it worse there).

Reconstruction fits the layers in order, each to correct the drift that the converted layers before it left, so
later layers are fitted to this layer's MoE output, not to its dense one. A dense FFN in one layer therefore also
undoes the corrections after it; only for the last layer does swapping equal building with that layer left dense.

Usage: python bench/bench_layer_swap.py LABEL=MOE_DIR   (run it alone; writes docs/results.md section 'layer-swap')"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from moefy.models import load_causal_lm
from moefy.profile.perplexity import heldout_perplexity
from moefy.sources import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_TOKENS, MODEL, setup  # noqa: E402
from docs_sections import replace_section  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("build", help="LABEL=MOE_DIR: a build of SmolLM2-135M")
    args = p.parse_args()
    label, moe_dir = args.build.split("=", 1)
    with tempfile.TemporaryDirectory(prefix="moefy-layer-swap-") as work:
        bench = setup(Path(work))  # the demo corpus, written here and read into memory
    moe, dense = load_causal_lm(moe_dir), load_causal_lm(resolve_model(MODEL).directory)

    def ppl():
        return heldout_perplexity(moe, bench.tokenizer, bench.held, seq_len=256, tokens_per_domain=EVAL_TOKENS)

    domains = list(bench.dense.per_domain)
    built = ppl()
    gap = math.log(built.ppl() / bench.dense.ppl())
    rows = []
    for i, layer in enumerate(moe.model.layers):
        converted = layer.mlp
        layer.mlp = dense.model.layers[i].mlp
        swapped = ppl()
        layer.mlp = converted
        rows.append((i, swapped, 1 - math.log(swapped.ppl() / bench.dense.ppl()) / gap))
        print(f"layer {i}: x{swapped.ppl() / bench.dense.ppl():.3f}", flush=True)

    def cells(x) -> str:
        return " | ".join(f"×{x.ppl(d) / bench.dense.ppl(d):.3f}" for d in [*domains, None])
    lines = [
        "## Where a build's gap sits by layer: one dense FFN put back (SmolLM2-135M, demo held-out)",
        "",
        f"`python bench/bench_layer_swap.py \"{label}=DIR\"`, alone on the machine. The build's held-out perplexity "
        f"({EVAL_TOKENS} tokens per domain) ÷ dense, then with the dense FFN in one layer and the build's own in every "
        "other; 'gap closed' = the share of the build's log-perplexity gap that the swap removes (negative: worse).",
        "",
        f"| layer with the dense FFN | {' | '.join(domains)} | overall | gap closed |",
        f"|---|{'---|' * len(domains)}---|---|",
        f"| none ({label}) | {cells(built)} | 0% |",
        *[f"| {i} | {cells(x)} | {100 * share:.1f}% |" for i, x, share in rows],
    ]
    replace_section(Path(__file__).parent.parent / "docs" / "results.md", "layer-swap", "\n".join(lines))


if __name__ == "__main__":
    main()
