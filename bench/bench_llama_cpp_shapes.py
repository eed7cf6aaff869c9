"""Is an MoE faster than its dense source in llama.cpp? It depends on the matrix widths (issue: llama.cpp parity and
speed, §3). On SmolLM2 (rows 576 wide, experts 48-192 wide) llama.cpp runs our MoEs' prompts slower than dense
(docs/results.md, section "frontier"). In the pinned llama.cpp an expert matmul (`mul_mat_id`) gets a tiled kernel
only for K-quant and IQ weights; f16 and q8_0 experts run one dot product per row and token, as long as the row
(576, or the expert's width for the down projection). This bench separates the shape from the model: random-weight
LLaMAs with SmolLM2's widths and with 2048-wide rows, random MoE splits of each at 25% of FFN neurons active
(Mixtral format, `random` method: timing does not look at the values) and, at 2048 wide, a carve build with
make demo's structure (shared block, fitted routers; calibrated on the demo corpus), each run in llama.cpp as f16,
Q4_K_M and Q6_K (`moefy export-gguf --outtype q4_k_m / q6_k`: llama.cpp's own quantizer), MoE ÷ dense in the same
run, interleaved (`moefy eval --speed`'s timing, evaluate/speed.py).

llama.cpp's extra buffer types are off (`use_extra_bufts=False`): on a Xeon with AMX they would run the dense
model's matmuls on AMX (MoE expert matmuls never, `mul_mat_id` has no AMX path), which no laptop has, and this
release crashes (SIGSEGV) loading a K-quant GGUF with them on such a CPU.

Usage: python bench/bench_llama_cpp_shapes.py [--work out/bench-llama-cpp-shapes]   (needs make setup-llama; alone)
Writes docs/results.md section 'llama-cpp-shapes'."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from moefy import api
from moefy.construct.plan import load_plan
from moefy.construct.recipe import BuildRecipe
from moefy.evaluate.speed import measure, ratios
from moefy.export.llama_cpp import LlamaCppLM, require_runtime
from moefy.recipes import validate_recipe
from moefy.sources import SIDE_FILES, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import MODEL, cpu_name, demo_corpus  # noqa: E402
from docs_sections import replace_section  # noqa: E402
from make_shape import write_checkpoint  # noqa: E402

BASE = dict(num_attention_heads=16, num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048)
# shape -> (config fields, splits (experts, top-k, method) at 25% of FFN neurons active). The random splits time any
# routing; carve adds what a real build has: the always-on shared eighth (Qwen2-MoE, GGUF granitemoe) and routers
# fitted on calibration text (here to a random model's activations). make demo's structure at 2048 wide keeps every
# width a multiple of 256: 1,024 shared, 28 experts of 256, which is what `moefy build` suggests (to_gguf.tiled_split)
# for the 25% carve split beside it, 56 experts of 128 top-8, whose down projections no K-quant holds.
SHAPES = {
    "SmolLM2's widths (576 / 1536, 30 layers)": (
        dict(BASE, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3), [(32, 8, "random"), (8, 2, "random")]),
    "2048 / 8192, 8 layers": (dict(BASE, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8),
                              [(32, 8, "random"), (8, 2, "random"), (56, 8, "carve"), (28, 4, "carve")]),
}
# the K-quants get llama.cpp's tiled expert kernel where a row's width is a multiple of 256 (2048 here, not 576)
OUTTYPES = ("f16", "q4_k_m", "q6_k")
PROMPT, NEW, REPEATS = 512, 32, 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("out/bench-llama-cpp-shapes"))
    args = ap.parse_args()
    require_runtime()  # before any work: the timing needs llama-cpp-python
    results = {}
    for s, (shape_name, (shape, splits)) in enumerate(SHAPES.items()):
        dense = dense_shape(args.work / f"shape{s}-dense", shape)
        models = {"dense": dense}
        for experts, top_k, method in splits:
            out = args.work / f"shape{s}-{experts}x{top_k}-{method}"
            recipe = {"model": str(dense), "method": method, "experts": experts, "top_k": top_k,
                      **({"calib": str(demo_corpus(args.work) / "calib")} if method == "carve" else {})}
            api.build(validate_recipe(BuildRecipe, recipe), out, overwrite=True)
            layer = next(iter(load_plan(out).layers.values()))
            shared = f" + {len(layer.shared)} shared ({method})" if len(layer.shared) else ""
            models[f"{experts} × {layer.experts.shape[1]}, top-{top_k}{shared}"] = out
        files = {label: {t: api.export_gguf(str(directory), args.work / f"{directory.name}-{t}.gguf", t, True).path
                         for t in OUTTYPES} for label, directory in models.items()}
        results[shape_name] = time_files(files)
        print(shape_name, json.dumps(results[shape_name], indent=1), flush=True)
    results["cpu"] = cpu_name()
    (args.work / "shapes.json").write_text(json.dumps(results, indent=1))
    write_docs(results)


def dense_shape(directory: Path, shape: dict) -> Path:
    """A random-weight LLaMA of this shape with MODEL's (SmolLM2's) tokenizer files, written once: llama.cpp's
    converter knows its pre-tokenizer."""
    if not (directory / "config.json").is_file():
        write_checkpoint(directory, shape)
        source = resolve_model(MODEL).directory
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, directory / name)
    return directory


def time_files(files: dict[str, dict[str, Path]]) -> dict:
    """{outtype: {label: {prefill, gen} ÷ dense}, and the dense model's own tok/s (kept in the JSON only: an absolute
    rate on a shared machine is noise)}: evaluate.speed.measure's medians of interleaved repeats, every file at once."""
    models = {(label, t): LlamaCppLM(path, n_ctx=PROMPT + NEW + 8, threads=2, extra_buffers=False)
              for label, by_type in files.items() for t, path in by_type.items()}
    ids = torch.from_numpy(np.random.default_rng(0).integers(100, 40000, (1, PROMPT)))
    speed = measure(models, ids, new_tokens=NEW, repeats=REPEATS)
    out = {}
    for t in OUTTYPES:
        base = speed["dense", t]
        out[t] = {"dense tok/s": {"prefill": base.prefill_tokens_per_s, "gen": base.generate_tokens_per_s}}
        for label in files:
            if label != "dense":
                x_dense = ratios(speed[label, t], base)
                out[t][label] = {"prefill": x_dense["prefill"], "gen": x_dense["generate"]}
    return out


def write_docs(results: dict) -> None:
    lines = ["### llama.cpp speed against matrix width", "",
             "`python bench/bench_llama_cpp_shapes.py` (needs `make setup-llama`), alone, on "
             f"{results['cpu']}, 2 threads. Random-weight LLaMAs and MoE splits of them at 25% of FFN "
             "neurons active: random (Mixtral format), and carve (shared block and routers fitted on the demo "
             "corpus's calibration split; Qwen2-MoE, GGUF granitemoe); each ÷ its dense model in the same run, same "
             f"outtype (medians of {REPEATS} interleaved repeats; prefill: {PROMPT} tokens, last logits only; "
             f"generation: {NEW} greedy tokens). The K-quants by `moefy export-gguf --outtype q4_k_m / q6_k` "
             "(llama.cpp's quantizer); llama.cpp's extra buffer types (AMX, repacking) off.", "",
             "| shape | experts | " + " | ".join(f"{t.upper()} {w}" for t in OUTTYPES for w in ("prefill", "gen"))
             + " |", "|---|---|" + "---|" * 2 * len(OUTTYPES)]
    for shape_name in SHAPES:
        r = results[shape_name]
        for label in r["f16"]:
            if label == "dense tok/s":
                continue
            cells = " | ".join(f"{r[t][label][w]:.2f}×" for t in OUTTYPES for w in ("prefill", "gen"))
            lines.append(f"| {shape_name} | {label} | {cells} |")
    replace_section(Path("docs/results.md"), "llama-cpp-shapes", "\n".join(lines))


if __name__ == "__main__":
    main()
