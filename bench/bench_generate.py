"""Sampling calibration text from the model (`moefy data generate`): seconds at each batch size, in one run, one
batch size after the other (SmolLM2, seed 0, 256-token texts). The texts differ between batch sizes (a batch draws
from one random stream), so this times the sampler, not one fixed set of texts.

Usage: python bench/bench_generate.py [--tokens 32768] [--batch-sizes 32 128]   (run it alone; prints one table for
docs/benchmarks.md)"""

from __future__ import annotations

import argparse
import time

from moefy.data.generate import sample_texts
from moefy.models import load_causal_lm, load_tokenizer
from moefy.sources import resolve_model

MODEL = "smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    args = ap.parse_args()
    directory = resolve_model(MODEL).directory
    model, tok = load_causal_lm(directory), load_tokenizer(directory)
    seconds = {}
    for b in args.batch_sizes:
        t0 = time.perf_counter()
        sample_texts(model, tok, args.tokens, batch_size=b)
        seconds[b] = time.perf_counter() - t0
    first = args.batch_sizes[0]
    print(f"\n{MODEL}, {args.tokens} tokens in texts of 256, fp32 on the CPU\n")
    print(f"| batch size | seconds | ÷ batch {first} |\n|---|---|---|")
    for b, s in seconds.items():
        print(f"| {b} | {s:.0f} | {s / seconds[first]:.2f}× |")


if __name__ == "__main__":
    main()
