"""`make demo`: build an 8-expert top-2 Mixtral from SmolLM2-135M, verify it, and print a summary.

Usage: python -m moefy.demo [--out DIR]. The demo only ever replaces a directory that a previous
moefy run wrote (it holds moefy.yaml); anything else at --out is refused, as with `moefy build`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moefy import api
from moefy.errors import MoefyError
from moefy.recipes import BuildRecipe
from moefy.sources import resolve_model

DEMO_RECIPE = BuildRecipe(model="smollm2-135m", experts=8, top_k=2, method="cluster", seed=0)


def run(out: Path) -> int:
    console = Console()
    ours = (out / api.RECIPE_NAME).is_file()
    console.print(f"[bold]moefy demo[/]: {DEMO_RECIPE.model} → {DEMO_RECIPE.experts} experts, "
                  f"top-{DEMO_RECIPE.top_k}, method {DEMO_RECIPE.method}, into {out}")
    resolve_model(DEMO_RECIPE.model)  # one-time GGUF dequantisation into the cache, kept out of the build time
    t0 = time.perf_counter()
    result = api.build(DEMO_RECIPE, out, overwrite=ours)
    t_build = time.perf_counter() - t0
    report = api.verify(out, DEMO_RECIPE.model)
    table = Table(title="moefy demo summary", show_header=False)
    rows = [
        ("output", f"{result.out} ({result.architecture}, loads with stock transformers)"),
        ("experts", f"{DEMO_RECIPE.experts} × {result.plan.meta.expert_size} neurons, top-{DEMO_RECIPE.top_k}"),
        ("params", f"{result.total_params / 1e6:.1f}M total, {result.active_params / 1e6:.1f}M active per token "
                   f"(dense {result.dense_params / 1e6:.1f}M)"),
        ("build time", f"{t_build:.1f} s"),
        ("exactness (all experts, uniform router)",
         f"max |Δlogits| = {report.max_abs_dlogits:.1e} → {'PASS' if report.passed else 'FAIL'}"),
        ("probe perplexity", f"dense {report.dense_ppl:.2f}, MoE as built {report.built_moe_ppl:.3g} "
                             "(training-free, before any training)"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moefy.demo")
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    args = parser.parse_args(argv)
    try:
        return run(args.out)
    except MoefyError as exc:
        print(f"moefy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
