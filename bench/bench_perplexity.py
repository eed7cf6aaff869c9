"""Peak host memory and time of `heldout_perplexity` (moefy eval, the demo, DIVE's cross-domain loss, training's
evaluations) on the demo corpus's held-out split. The logits of a batch are vocabulary-wide: at long contexts they,
and any fp32 copy of them, are the largest tensors of an evaluation.

    python bench/bench_perplexity.py smollm2-135m --seq-len 1024 --batch 8

Runs in a child process, alone; prints the peak RSS above what the process held with the model loaded, and the
seconds. Results: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(model: str, seq_len: int, batch: int, tokens: int) -> dict:
    from moefy.data.corpus import load_corpus
    from moefy.data.demo_corpus import build_demo_corpus
    from moefy.host_memory import release_freed
    from moefy.models import load_causal_lm, load_tokenizer
    from moefy.profile.perplexity import heldout_perplexity
    from moefy.sources import resolve_model

    work = Path(tempfile.mkdtemp(prefix="moefy-ppl-bench-"))
    build_demo_corpus(work / "corpus")
    held = load_corpus(work / "corpus" / "heldout")
    source = resolve_model(model)
    lm, tok = load_causal_lm(source.directory), load_tokenizer(source.directory)
    release_freed()
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    ppl = heldout_perplexity(lm, tok, held, seq_len, tokens, batch_size=batch)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - floor
    return {"seconds": seconds, "peak": peak, "ppl": ppl.ppl(), "scored": sum(ppl.tokens.values()),
            "vocab": lm.config.vocab_size, "dtype": str(next(lm.parameters()).dtype)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens per domain")
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.seq_len, args.batch, args.tokens)))
        return
    out = subprocess.run([sys.executable, __file__, args.model, "--seq-len", str(args.seq_len), "--batch",
                          str(args.batch), "--tokens", str(args.tokens), "--child"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    logits = args.batch * args.seq_len * r["vocab"] * 4
    print(f"| {args.model} ({r['dtype']}) | {args.seq_len} × {args.batch} | {logits / 2**30:.2f} GiB "
          f"| {r['peak'] / 2**30:.2f} GiB | {r['seconds']:.1f} s | {r['scored']} | {r['ppl']:.4f} |")


if __name__ == "__main__":
    main()
