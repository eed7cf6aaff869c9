"""What `moefy build`'s K-quant suggestion buys in llama.cpp (issue: llama.cpp parity and speed, §3). When a model's
hidden size is a multiple of 256 and its experts are not, the build prints the flags of the nearest split whose
experts are (`export.to_gguf.tiled_split`), because llama.cpp's tiled expert kernel takes only K-quant weights and a
K-quant needs rows that are multiples of 256. This bench builds carve with the recipe's defaults (8 experts, top-2,
a shared eighth: what `moefy build --method carve` gives without flags) on a random-weight LLaMA with TinyLlama's
widths (2048 / 5632, 8 layers), asks the build for the suggestion (`BuildResult.gguf_split`), builds that too,
and times both in llama.cpp as f16, Q4_K_M and Q6_K, each ÷ the dense model in the same outtype and run
(bench_llama_cpp_shapes' timing: `evaluate.speed.measure` over `LlamaCppLM`, extra buffer types off).

Usage: python bench/bench_tiled_split.py [--work out/bench-tiled-split]   (needs make setup-llama; run it alone)
Writes docs/results.md section 'tiled-split'."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moefy import api
from moefy.construct.recipe import BuildRecipe
from moefy.export.llama_cpp import require_runtime
from moefy.recipes import validate_recipe

sys.path.insert(0, str(Path(__file__).parent))
from bench_llama_cpp_shapes import BASE, NEW, OUTTYPES, PROMPT, REPEATS, dense_shape, time_files  # noqa: E402
from common import cpu_name, demo_corpus  # noqa: E402
from docs_sections import replace_section  # noqa: E402

SHAPE = dict(BASE, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
             num_key_value_heads=4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("out/bench-tiled-split"))
    args = ap.parse_args()
    require_runtime()  # before any work: the timing needs llama-cpp-python
    dense = dense_shape(args.work / "dense", SHAPE)
    calib = str(demo_corpus(args.work) / "calib")

    def build(name: str, **fields) -> tuple[str, Path, api.BuildResult]:
        out = args.work / name
        recipe = {"model": str(dense), "method": "carve", "calib": calib, **fields}
        result = api.build(validate_recipe(BuildRecipe, recipe), out, overwrite=True)
        m = result.plan.meta
        return (f"{m.num_experts} × {m.expert_size}, top-{m.top_k} + {m.shared_size} shared "
                f"({result.active_fraction:.1%} active)"), out, result

    default_label, default, result = build("default")
    plan, split = result.plan, result.gguf_split
    if split is None:  # the shape above has 616-wide experts at the defaults; a change to them would land here
        raise SystemExit(f"moefy build suggests nothing for {default_label}: its experts already tile")
    flags = split.flags(plan.meta.ffn_width, plan.meta.shared_size > 0)
    suggested_label, suggested, _ = build("suggested", experts=split.experts, top_k=split.top_k,
                                       shared_fraction=split.shared_fraction(plan.meta.ffn_width))
    labels = {"dense": dense, f"carve, the recipe's defaults: {default_label}": default,
              f"carve, build's suggestion `{flags}`: {suggested_label}": suggested}
    files = {label: {t: api.export_gguf(str(d), args.work / f"{d.name}-{t}.gguf", t, True).path for t in OUTTYPES}
             for label, d in labels.items()}
    result = {"cpu": cpu_name(), "rows": time_files(files)}
    (args.work / "tiled_split.json").write_text(json.dumps(result, indent=1))
    write_docs(result["rows"], result["cpu"])


def write_docs(rows: dict, cpu: str) -> None:
    lines = ["### llama.cpp speed: what `moefy build`'s K-quant suggestion buys", "",
             f"`python bench/bench_tiled_split.py` (needs `make setup-llama`), alone, on {cpu}, 2 threads. A "
             "random-weight LLaMA with TinyLlama's widths (2048 / 5632, 8 layers); carve built with the recipe's "
             "defaults, then with the flags `moefy build` prints for it (`export.to_gguf.tiled_split`: experts "
             "256 wide, which a K-quant holds), both calibrated on the demo corpus; each ÷ the dense model in the "
             f"same run and outtype (medians of {REPEATS} interleaved repeats; prefill: {PROMPT} tokens, last logits "
             f"only; generation: {NEW} greedy tokens); llama.cpp's extra buffer types off.", "",
             "| build | " + " | ".join(f"{t.upper()} {w}" for t in OUTTYPES for w in ("prefill", "gen")) + " |",
             "|---|" + "---|" * 2 * len(OUTTYPES)]
    for label in rows[OUTTYPES[0]]:
        if label != "dense tok/s":
            lines.append(f"| {label} | " + " | ".join(f"{rows[t][label][w]:.2f}×" for t in OUTTYPES
                                                      for w in ("prefill", "gen")) + " |")
    replace_section(Path(__file__).parent.parent / "docs" / "results.md", "tiled-split", "\n".join(lines))


if __name__ == "__main__":
    main()
