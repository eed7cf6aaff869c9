"""How fast a built MoE runs in stock transformers on this CPU with each of transformers' experts implementations,
each ÷ the dense source in the same run (issue: clients and speed, §3: "the per-token routing overhead is the thing
to remove"). transformers picks `grouped_mm` by default; `eager` loops over the experts that got tokens. Beside the
speeds, the matmul calls one generated token makes (a 1-token forward, counted by torch.profiler): on CPU a decode
step is a few microseconds of arithmetic per call, so the call count, not the FLOPs, sets its time.
(bench_speed.py asks the other question: random builds of any checkpoint at several granularities, on any device,
with transformers' default implementation.)

`batched_mm` gathers every token's chosen expert weights, one copy per token: a prompt of 4 × 512 tokens ran at
0.06× dense in a trial run, so its prompt rate is not measured (it would take most of an hour). Its generation
(batch 1, a 32-token prompt, where the gather is k experts' weights) is measured in a second pass, against the
dense model again in that pass.

With --compile every model (the dense one too) is timed compiled by torch.compile's inductor, generating on a
static KV cache (`evaluate/speed.py:measure`), each compiled before it is timed: the compiled code runs the routing's
small ops without Python between them, which is the per-token overhead the plain rows pay. Compiled, batched_mm's
gather no longer copies weights, so it is timed in full with the others. eager is left out: torch.compile breaks its
graph at every expert (evaluate/options.py).

Usage: python bench/bench_experts_impl.py [--compile] LABEL=MOE_DIR...   (run it alone; writes docs/results.md
section 'experts-impl', or 'experts-impl-compiled')"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moefy.evaluate.options import EXPERTS_IMPLEMENTATIONS, NOT_COMPILABLE
from moefy.evaluate.speed import measure, ratios
from moefy.models import load_causal_lm
from moefy.sources import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import MODEL, cpu_name  # noqa: E402
from docs_sections import replace_section  # noqa: E402

GENERATION_ONLY = ("batched_mm",)  # uncompiled, its prompts are too slow to time
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")  # grouped_mm itself is not one: its per-expert mm calls are
BATCH, PROMPT, NEW = 4, 512, 64


@torch.no_grad()
def matmuls_per_token(model) -> int:
    """Matmul calls of one 1-token forward, nested calls included (CPU grouped_mm runs one mm per expert)."""
    x = torch.zeros(1, 1, dtype=torch.long)
    model(input_ids=x)  # warm-up: first calls allocate
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(input_ids=x)
    return sum(e.count for e in prof.key_averages() if e.key in MATMULS)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", metavar="LABEL=MOE_DIR", help="built MoE directories, each with its row label")
    p.add_argument("--compile", action="store_true", help="time every model compiled (torch.compile, inductor)")
    args = p.parse_args()
    backend = "inductor" if args.compile else None
    left_out = NOT_COMPILABLE if args.compile else GENERATION_ONLY
    timed = tuple(i for i in EXPERTS_IMPLEMENTATIONS if i not in left_out)
    generation_only_impls = () if args.compile else GENERATION_ONLY
    dense = load_causal_lm(resolve_model(MODEL).directory)
    models, generation_only, rows = {"dense": dense}, {"dense": dense}, {}
    for label, directory in (m.split("=", 1) for m in args.models):
        for impl in timed + generation_only_impls:
            model = load_causal_lm(Path(directory))
            model.set_experts_implementation(impl)
            (generation_only if impl in generation_only_impls else models)[f"{label}, {impl}"] = model
            rows[f"{label}, {impl}"] = model
    probe = torch.randint(0, dense.config.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    speed = measure(models, probe, new_tokens=NEW, compile_backend=backend)
    base = speed["dense"]
    # measure() also times a forward of its input; one 32-token row keeps that short for batched_mm
    speed_gen = measure(generation_only, probe[:1, :32], new_tokens=NEW) if generation_only_impls else {}
    title, flag, how = ((" compiled", " --compile", ", every model (the dense one too) compiled by torch.compile's "
                         "inductor and generating on a static KV cache, each compiled before it is timed")
                        if args.compile else ("", "", ""))
    lines = [f"## Experts implementation in transformers (CPU){title}", "",
             f"`python bench/bench_experts_impl.py{flag} LABEL=MOE_DIR...`, alone, on {cpu_name()}. Each model ÷ "
             f"the dense source in the same run (prompt {BATCH} × {PROMPT} tokens, scored with every position's "
             f"logits or prefilled with the last one's as generation does; generation {NEW} greedy tokens; "
             f"medians of 3 interleaved repeats, fp32, torch's default threads{how}), loaded with stock "
             "transformers and `set_experts_implementation`. Matmul calls: one 1-token forward (not compiled), nested "
             "calls counted (torch.profiler)." + ("" if args.compile else " batched_mm's generation is timed in a "
             "second pass beside the dense model again; its prompt rates are not measured (0.06× dense in a trial: it "
             "copies each token's expert weights)."), "",
             "| model | experts implementation | prompt ÷ dense | prefill ÷ dense | generation ÷ dense "
             "| matmul calls per token |",
             "|---|---|---|---|---|---|",
             f"| dense | | 1.00× | 1.00× | 1.00× | {matmuls_per_token(models['dense'])} |"]
    for name, model in rows.items():
        label, impl = name.rsplit(", ", 1)
        if name in models:
            r = ratios(speed[name], base)
            prompt, prefill = f"{r['forward']:.2f}×", f"{r['prefill']:.2f}×"
        else:
            r = ratios(speed_gen[name], speed_gen["dense"])
            prompt = prefill = "not measured"
        lines.append(f"| {label} | {impl} | {prompt} | {prefill} | {r['generate']:.2f}× | {matmuls_per_token(model)} |")
        print(lines[-1], flush=True)
    lines += ["", "Dense absolute rates in this run (noise on a shared machine; only the ratios are claims): prompt "
              f"{base.forward_tokens_per_s:.0f} tok/s scored, {base.prefill_tokens_per_s:.0f} tok/s prefilled, "
              f"generation {base.generate_tokens_per_s:.1f} tok/s."]
    section = "experts-impl-compiled" if args.compile else "experts-impl"
    replace_section(Path(__file__).parent.parent / "docs" / "results.md", section, "\n".join(lines))


if __name__ == "__main__":
    main()
