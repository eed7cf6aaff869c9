"""The `fit` router init alone (construct/router_fit.py, carve's default router): seconds per layer and peak RSS above
its inputs, on SmolLM2-135M's calibration statistics (carve's partition, every 3rd layer) and on a LLaMA-2-7B-shaped
layer with random weights (hidden 4,096, FFN 11,008, 2,048 sampled tokens, a shared eighth left out). Each case runs
in a child process, so one case's allocations do not set another's peak.

Usage: python bench/bench_router_fit.py [--ref FILE]   (run it alone; writes docs/benchmarks.md section 'router-fit')
--ref FILE: also time another copy of router_fit.py on the same inputs (e.g. `git show REV:src/moefy/construct/
router_fit.py > old.py`), and compare the routers and scales."""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

CASES = [("SmolLM2-135M, carve 56 × 24 top-8 (10 layers)", "smollm2", 56, 8),
         ("SmolLM2-135M, carve 28 × 48 top-4 (10 layers)", "smollm2", 28, 4),
         ("LLaMA-2-7B shape, 56 experts top-8, random weights (1 layer)", "7b", 56, 8)]


def _module(path: str | None):
    if path is None:
        from moefy.construct import router_fit
        return router_fit
    spec = importlib.util.spec_from_file_location("router_fit_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(kind: str, experts: int, top_k: int):
    """Per layer: (hidden, gate, up, down, groups, top_k, ridge), as carve's registry would pass them."""
    if kind == "7b":
        g = torch.Generator().manual_seed(0)
        hidden, width = 4096, 11008
        gate, up = (torch.randn(width, hidden, generator=g) * 0.02 for _ in range(2))
        down = torch.randn(hidden, width, generator=g) * 0.02
        groups = np.array_split(np.arange(width // 8, width), experts)
        return [(torch.randn(2048, hidden, generator=g).half(), gate, up, down, groups, top_k, 1e-2)]
    sys.path.insert(0, str(Path(__file__).parent))
    from common import carve_layers
    layers = []
    for _, layer, split, recipe in carve_layers(dict(experts=experts, top_k=top_k), every=3):
        layers.append((layer.stats("carve")["hidden"], layer.weight("gate"), layer.weight("up"),
                       layer.weight("down"), split.routed, top_k, recipe.router.ridge))
    return layers


def child(kind: str, experts: int, top_k: int, ref: str | None) -> dict:
    layers = _inputs(kind, experts, top_k)
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fit = _module(ref).fit_router
    seconds, results = 0.0, []
    for args in layers:
        t0 = time.perf_counter()
        results.append(fit(*args))
        seconds += time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"s_per_layer": seconds / len(layers), "peak_mib": (peak - floor) / 1024,
            "routers": [r.tolist() for r, _ in results], "scales": [s for _, s in results]}


def _run(case: tuple, ref: str | None) -> dict:
    _, kind, experts, top_k = case
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, experts, top_k, ref])],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ref", help="another router_fit.py to time on the same inputs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_sections import replace_section
    head = "| case | s per layer | peak MiB above the inputs |"
    if args.ref:
        head += (" ref: s per layer | ref: peak MiB | time ÷ ref | largest router difference ÷ its norm |"
                 " scales equal to 1e-6 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case in CASES:
        now = _run(case, None)
        row = f"| {case[0]} | {now['s_per_layer']:.3f} | {now['peak_mib']:.0f} |"
        if args.ref:
            ref = _run(case, args.ref)
            diff = max(float((torch.tensor(a) - torch.tensor(b)).norm() / torch.tensor(b).norm())
                       for a, b in zip(now["routers"], ref["routers"]))
            same = all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(now["scales"], ref["scales"]))
            ratio = now["s_per_layer"] / ref["s_per_layer"]
            row += (f" {ref['s_per_layer']:.3f} | {ref['peak_mib']:.0f} | {ratio:.2f}× | {diff:.1e} |"
                    f" {'yes' if same else 'no'} |")
        lines.append(row)
        print(row, flush=True)
    ref_note = f" `--ref` was {args.ref}." if args.ref else ""
    text = "\n".join(["### The router fit alone (issues: near-lossless conversion, scale §1)", "",
                      "`python bench/bench_router_fit.py" + (" --ref FILE" if args.ref else "") + "`, alone on the "
                      "machine: `fit_router` on the inputs carve's registry would pass it; peak RSS of its child "
                      "process above the moment its inputs exist." + ref_note, "", *lines])
    replace_section(Path(__file__).parent.parent / "docs" / "benchmarks.md", "router-fit", text)


if __name__ == "__main__":
    main()
