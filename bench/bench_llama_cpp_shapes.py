"""Is an MoE faster than its dense source in llama.cpp? It depends on the matrix widths (issue: llama.cpp parity and
speed, §3). On SmolLM2 (rows 576 wide, experts 48-192 wide) llama.cpp runs our MoEs' prompts slower than dense
(docs/results.md, section "frontier"). In the pinned llama.cpp an expert matmul (`mul_mat_id`) gets a tiled kernel
only for K-quant and IQ weights; f16 and q8_0 experts run one dot product per row and token, as long as the row
(576, or the expert's width for the down projection). This bench separates the shape from the model: random-weight
LLaMAs with SmolLM2's widths and with 2048-wide rows, random MoE splits of each at 25% of FFN neurons active
(Mixtral format, `random` method: timing does not look at the values), each run in llama.cpp as f16 and as Q4_K_M
(`moefy export-gguf --outtype q4_k_m`: llama.cpp's own quantizer), MoE ÷ dense in the same run, interleaved.

llama.cpp's extra buffer types are off (`use_extra_bufts=False`): on a Xeon with AMX they would run the dense
model's matmuls on AMX (MoE expert matmuls never, `mul_mat_id` has no AMX path), which no laptop has, and this
release crashes (SIGSEGV) loading a K-quant GGUF with them on such a CPU.

Usage: python bench/bench_llama_cpp_shapes.py [--work out/bench-llama-cpp-shapes]   (needs make setup-llama; alone)
Writes docs/results.md section 'llama-cpp-shapes'."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from moefy import api
from moefy.construct.recipe import BuildRecipe
from moefy.export.llama_cpp import require_runtime
from moefy.export.llama_cpp_buffers import without_extra_buffers
from moefy.recipes import validate_recipe
from moefy.sources import SIDE_FILES, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from docs_sections import replace_section  # noqa: E402
from make_shape import write_checkpoint  # noqa: E402

MODEL = "smollm2-135m"  # its tokenizer and side files: llama.cpp's converter knows its pre-tokenizer
BASE = dict(num_attention_heads=16, num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048)
# shape -> (config fields, splits (experts, top-k) at 25% of FFN neurons active)
SHAPES = {
    "SmolLM2's widths (576 / 1536, 30 layers)": (
        dict(BASE, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3), [(32, 8), (8, 2)]),
    "2048 / 8192, 8 layers": (dict(BASE, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8),
                              [(32, 8), (8, 2)]),
}
OUTTYPES = ("f16", "q4_k_m")
PROMPT, NEW, REPEATS = 512, 32, 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("out/bench-llama-cpp-shapes"))
    args = ap.parse_args()
    llama_cpp = require_runtime()
    source = resolve_model(MODEL).directory
    tokenizer_files = [source / name for name in SIDE_FILES if (source / name).is_file()]
    results = {}
    for s, (shape_name, (shape, splits)) in enumerate(SHAPES.items()):
        dense = args.work / f"shape{s}-dense"
        if not (dense / "config.json").is_file():
            write_checkpoint(dense, shape)
            for f in tokenizer_files:
                shutil.copy(f, dense / f.name)
        models = {"dense": dense}
        for experts, top_k in splits:
            out = args.work / f"shape{s}-{experts}x{top_k}"
            recipe = {"model": str(dense), "method": "random", "experts": experts, "top_k": top_k}
            api.build(validate_recipe(BuildRecipe, recipe), out, overwrite=True)
            models[f"{experts} × {shape['intermediate_size'] // experts}, top-{top_k}"] = out
        files = {label: {t: api.export_gguf(str(directory), args.work / f"{directory.name}-{t}.gguf", t, True).path
                         for t in OUTTYPES} for label, directory in models.items()}
        results[shape_name] = time_files(llama_cpp, files)
        print(shape_name, json.dumps(results[shape_name], indent=1), flush=True)
    results["cpu"] = cpu_name()
    (args.work / "shapes.json").write_text(json.dumps(results, indent=1))
    write_docs(results)


def time_files(llama_cpp, files: dict[str, dict[str, Path]]) -> dict:
    """{outtype: {label: {prefill, gen} ÷ dense}, and the dense model's own tok/s (kept in the JSON only: an absolute
    rate on a shared machine is noise)}: medians of interleaved repeats."""
    with without_extra_buffers(llama_cpp):
        llms = {(label, t): llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT + NEW + 8, logits_all=False,
                                            verbose=False, n_threads=2, n_batch=PROMPT)
                for label, by_type in files.items() for t, path in by_type.items()}
    ids = np.random.default_rng(0).integers(100, 40000, PROMPT).tolist()
    pre, gen = {k: [] for k in llms}, {k: [] for k in llms}
    for _ in range(REPEATS):
        for key, llm in llms.items():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)  # logits of the last position only (logits_all=False): a prefill
            pre[key].append(PROMPT / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for n, _tok in enumerate(llm.generate(ids[:32], temp=0.0, top_k=1, reset=True), 1):
                if n == NEW:
                    break
            gen[key].append(NEW / (time.perf_counter() - t0))
    for llm in llms.values():
        llm.close()
    out = {}
    for t in OUTTYPES:
        base = statistics.median(pre[("dense", t)]), statistics.median(gen[("dense", t)])
        out[t] = {"dense tok/s": {"prefill": base[0], "gen": base[1]}}
        for label in files:
            if label != "dense":
                out[t][label] = {"prefill": statistics.median(pre[(label, t)]) / base[0],
                                 "gen": statistics.median(gen[(label, t)]) / base[1]}
    return out


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_docs(results: dict) -> None:
    lines = ["### llama.cpp speed against matrix width", "",
             "`python bench/bench_llama_cpp_shapes.py` (needs `make setup-llama`), alone, on "
             f"{results['cpu']}, 2 threads. Random-weight LLaMAs and random MoE splits of them at 25% of FFN neurons "
             "active (Mixtral format); each ÷ its dense model in the same run, same outtype (medians of "
             f"{REPEATS} interleaved repeats; prefill: {PROMPT} tokens, last logits only; generation: {NEW} greedy "
             "tokens). Q4_K_M by `moefy export-gguf --outtype q4_k_m` (llama.cpp's quantizer); llama.cpp's extra "
             "buffer types (AMX, repacking) off.", "",
             "| shape | experts | f16 prefill | f16 gen | Q4_K_M prefill | Q4_K_M gen |", "|---|---|---|---|---|---|"]
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
