"""Training memory benchmark (issue: scale). A random 8-expert top-2 MoE built in bf16 from a model or a shape
(bench/make_shape.py), then the same `router+norm` stage with gradient checkpointing, once with the frozen weights
in float32 (the default) and once kept in the MoE's dtype (`frozen_dtype: source`). Each run is a fresh child
process, so its peak RSS is its own; reported above the RSS after imports, with the step rate of both, whether
their losses agree bit for bit, and the minor page faults of the whole run (load to export) per step. RSS counts
the pages of the memory-mapped checkpoint that were read, which the kernel drops under pressure; the peak of
anonymous memory alone is what must fit (sampled every 0.1 s: a lower bound).
--distill makes the stage distil from the dense source as its teacher (held beside the MoE, in float32 or in its
stored dtype with the frozen weights).

Usage: python bench/bench_train_memory.py [--model .cache/shapes/tinyllama-1b] [--steps 3] [--seq-len 256]
    [--only source]   # skip float32 where it cannot fit (a 7B MoE is 27 GB in float32)
    [--distill]"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from memory_use import AnonPeak, rss  # noqa: E402

MODES = ("float32", "source")


def child(moe: Path, data: Path, recipe: Path, out: Path) -> dict:
    import accelerate  # noqa: F401  (imported by the loop; part of the floor, not of training)
    import transformers  # noqa: F401

    from moefy import api

    floor = rss()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with AnonPeak(0.1) as sampled:
        t0 = time.perf_counter()
        api.train(moe, str(data), recipe, out)
        seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "peak_rss": rss(),
            "rss_after_imports": floor, "peak_anon": sampled.peak, "anon_after_imports": sampled.start,
            "losses": [r["loss"] for r in records], "page_faults_per_step": faults / len(records),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records)}


def run_child(moe: Path, data: Path, recipe: Path, out: Path) -> dict:
    env = {**os.environ, "MOEFY_QUIET": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(moe), "--data", str(data), "--recipe",
                           str(recipe), "--out", str(out)], capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1],
                "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=".cache/shapes/tinyllama-1b")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--only", choices=MODES)
    p.add_argument("--distill", action="store_true")
    p.add_argument("--child", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--recipe", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.recipe, args.out)))
        return

    from common import cpu_name, demo_corpus

    from moefy import api
    from moefy.construct.recipe import BuildRecipe

    with tempfile.TemporaryDirectory(prefix="moefy-bench-train-memory-") as tmp:
        work = Path(tmp)
        data = demo_corpus(work) / "calib"
        moe = work / "moe"
        api.build(BuildRecipe(model=args.model, experts=8, top_k=2, method="random", dtype="bfloat16"), moe)
        size = sum(f.stat().st_size for f in moe.glob("*.safetensors"))
        stage = {"name": "r", "trainable": "router+norm", "tokens": args.steps * args.seq_len, "seq_len": args.seq_len,
                 "batch_size": 1, "lr": 1e-3, "warmup_steps": 1, **({"distill": {}} if args.distill else {})}
        results = {}
        for mode in (args.only,) if args.only else MODES:
            recipe = work / f"{mode}.yaml"
            recipe.write_text(yaml.safe_dump({"stages": [stage], "gradient_checkpointing": True,
                                              "mixed_precision": "no", "frozen_dtype": mode,
                                              "checkpoint_every": 10**6}))
            results[mode] = run_child(moe, data, recipe, work / f"run-{mode}")
    print(f"model {args.model}; MoE 8 experts top-2, random, bf16: {size / 2**30:.2f} GiB on disk; {cpu_name()}; "
          f"{args.steps} router+norm steps of {args.seq_len} tokens, gradient checkpointing"
          + (", distilling from the dense source" if args.distill else ""))
    print("| frozen weights | peak RSS − RSS after imports | ÷ MoE size on disk | peak anonymous − after imports | "
          "÷ MoE size on disk | tokens/s (median step) | minor page faults ÷ steps | run s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        if "error" in r:
            print(f"| {mode} | failed: {r['error']} | | | | | | |")
            continue
        above = r["peak_rss"] - r["rss_after_imports"]
        anon = r["peak_anon"] - r["anon_after_imports"]
        print(f"| {mode} | {above / 2**30:.2f} GiB | {above / size:.2f}× | {anon / 2**30:.2f} GiB | "
              f"{anon / size:.2f}× | {r['tokens_per_s']:.1f} | {r['page_faults_per_step'] / 1e3:.0f}k | "
              f"{r['seconds']:.0f} |")
    if len(results) == 2 and all("losses" in r for r in results.values()):
        same = results["float32"]["losses"] == results["source"]["losses"]
        print(f"losses {'identical' if same else 'differ'}: {results['source']['losses']}")


if __name__ == "__main__":
    main()
