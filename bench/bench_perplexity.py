"""Peak host memory and time of `heldout_perplexity` (moefy eval, the demo, DIVE's cross-domain loss, training's
evaluations) on the demo corpus's held-out split. The logits of a batch are vocabulary-wide: at long contexts they,
and any fp32 copy of them, are the largest tensors of an evaluation.

    python bench/bench_perplexity.py smollm2-135m --seq-len 1024 --batch 8

Runs in a child process, alone; prints the peak RSS above what the process held with the model loaded, and the
seconds. A second child runs one forward of a batch of that shape and nothing else, for what the evaluation adds
over the model's own forward. Results: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def forward_only(model: str, seq_len: int, batch: int) -> dict:
    import torch

    from moefy.host_memory import release_freed
    from moefy.models import load_causal_lm
    from moefy.sources import resolve_model

    lm = load_causal_lm(resolve_model(model).directory)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    release_freed()
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        lm(input_ids=ids)
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - floor}


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
    p.add_argument("--child", choices=["perplexity", "forward"])
    args = p.parse_args()
    if args.child:
        run = (child(args.model, args.seq_len, args.batch, args.tokens) if args.child == "perplexity"
               else forward_only(args.model, args.seq_len, args.batch))
        print(json.dumps(run))
        return
    r, fwd = (json.loads(subprocess.run([sys.executable, __file__, args.model, "--seq-len", str(args.seq_len),
                                         "--batch", str(args.batch), "--tokens", str(args.tokens), "--child", which],
                                        check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
              for which in ("perplexity", "forward"))
    logits = args.batch * args.seq_len * r["vocab"] * 4
    print("| model | batch × context | one batch's logits (fp32) | peak RSS above the loaded model: evaluation "
          "| one forward alone | seconds | scored tokens | perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.model} ({r['dtype']}) | {args.batch} × {args.seq_len} | {logits / 2**30:.2f} GiB "
          f"| {r['peak'] / 2**30:.2f} GiB | {fwd['peak'] / 2**30:.2f} GiB | {r['seconds']:.1f} | {r['scored']} "
          f"| {r['ppl']:.4f} |")


if __name__ == "__main__":
    main()
