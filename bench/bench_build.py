"""Build benchmark (issue: moefy build). For SmolLM2-135M and the methods random and cluster, report in one run:
  - build wall time / the time to read the source checkpoint and write a copy of it once;
  - peak RSS / the source checkpoint size (and the same for the plain copy, for the import floor).
Each measurement runs in a fresh child process, so RSS is that stage's alone. Results: docs/benchmarks.md.

Usage: python bench/bench_build.py [--repeats 3] [--model smollm2-135m]"""

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

METHODS = ("random", "cluster")


def child(kind: str, model: str, out: Path) -> dict:
    from safetensors.torch import load_file, save_file

    from moefy import api
    from moefy.construct.recipe import BuildRecipe
    from moefy.sources import resolve_model

    source = resolve_model(model)  # cached after the first run; not timed
    rss_floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if kind == "copy":
        out.mkdir()
        for f in sorted(source.directory.glob("*.safetensors")):
            save_file(load_file(str(f)), str(out / f.name), metadata={"format": "pt"})
    else:
        api.build(BuildRecipe(model=model, experts=8, top_k=2, method=kind), out)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in source.directory.glob("*.safetensors"))
    return {"kind": kind, "seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_imports": rss_floor, "checkpoint_bytes": size}


def run_child(kind: str, model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MOEFY_QUIET": "1"}
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--model", model, "--out", f"{tmp}/o"],
                              capture_output=True, text=True, env=env, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.out)))
        return
    run_child("copy", args.model)  # warm the GGUF cache and the page cache
    runs: dict[str, list[dict]] = {k: [] for k in ("copy", *METHODS)}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every kind alike
        for kind in runs:
            runs[kind].append(run_child(kind, args.model))
    copy_s = statistics.median(r["seconds"] for r in runs["copy"])
    size = runs["copy"][0]["checkpoint_bytes"]
    print(f"model {args.model}, checkpoint {size / 2**20:.0f} MiB, median of {args.repeats} runs, 8 experts top-2\n")
    print("| stage | time / copy time | peak RSS / checkpoint size | RSS after imports / checkpoint size | "
          "peak RSS − RSS after imports |")
    print("|---|---|---|---|---|")
    for kind, rs in runs.items():
        t = statistics.median(r["seconds"] for r in rs) / copy_s
        rss = statistics.median(r["peak_rss"] for r in rs)
        floor = statistics.median(r["rss_after_imports"] for r in rs)
        print(f"| {'read + write copy' if kind == 'copy' else 'build ' + kind} | {t:.2f}× | {rss / size:.2f}× | "
              f"{floor / size:.2f}× | {(rss - floor) / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
