"""Expert granularity at 25% of FFN neurons active: quality against speed (issue: llama.cpp parity and speed, §3).
SmolLM2-135M, demo corpus; every row is carve with closed-form reconstruction (no Adam steps, to keep the sweep
short), so the rows differ only in how the active quarter is cut: many small experts route better, few large ones
run faster. Speed (the prompt scored, the prompt prefilled, generation) is each model ÷ dense in the same client and
run: transformers (f32) as loaded, transformers compiled (torch.compile's inductor, every MoE with the batched_mm
experts kernel, generating on a static KV cache: the README's fast recipe; the dense model compiled too), and
llama.cpp (f16 GGUF).

Usage: python bench/bench_frontier.py [--work out/bench-frontier] [--docs-only]   (needs make setup-llama; run it
alone; --docs-only rewrites the docs from --work/frontier.json)
Writes docs/results.md section 'frontier' and docs/frontier.png."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moefy import api
from moefy.evaluate.speed import measure, ratios
from moefy.export.llama_cpp import LlamaCppLM
from moefy.models import load_causal_lm
from moefy.sources import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import MODEL, cpu_name, saved_rows, setup  # noqa: E402
from docs_sections import replace_section  # noqa: E402

CLOSED_FORM = {"enabled": True, "steps": 0}
# (label, fields): each keeps 384 of 1,536 neurons active per token (shared neurons counted).
ROWS = [
    ("56 experts × 24, top-8, + 192 shared", dict(experts=56, top_k=8)),
    ("28 × 48, top-4, + 192 shared", dict(experts=28, top_k=4)),
    ("14 × 96, top-2, + 192 shared", dict(experts=14, top_k=2)),
    ("16 × 96, top-4, no shared (Mixtral)", dict(experts=16, top_k=4, shared_fraction=0.0)),
    ("8 × 192, top-2, no shared (Mixtral)", dict(experts=8, top_k=2, shared_fraction=0.0)),
]
PROMPT, NEW = 512, 64
COMPILED = "transformers compiled"
FAST_KERNEL = "batched_mm"  # the kernel the README's compiled recipe uses (docs/results.md, experts-impl-compiled)
CLIENTS = ("transformers", COMPILED, "llama.cpp")
# column -> Speed's rate: the prompt scored (every position's logits), prefilled (the last one's, as generation and
# llama-bench compute it), and generation
RATES = {"prompt": "forward", "prefill": "prefill", "gen": "generate"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("out/bench-frontier"))
    ap.add_argument("--docs-only", action="store_true", help="rewrite the docs section from --work/frontier.json")
    args = ap.parse_args()
    if args.docs_only:
        write_docs(*saved_rows(args.work / "frontier.json"))
        return
    bench = setup(args.work)
    dense_dir = resolve_model(MODEL).directory
    hf, ll, rows = {"dense": load_causal_lm(dense_dir)}, {}, {}
    fast = {"dense": hf["dense"]}  # measure() gives a compiled model its plain forward back; the MoEs differ in kernel
    # llama.cpp's extra buffer types off: on a Xeon with AMX they would run the dense model's matmuls on AMX and never
    # an MoE's expert matmuls (mul_mat_id), which no laptop has
    ll["dense"] = LlamaCppLM(api.export_gguf(str(dense_dir), args.work / "dense.gguf", "f16", True).path,
                             n_ctx=PROMPT + NEW + 8, extra_buffers=False)
    for i, (label, fields) in enumerate(ROWS):
        out = bench.build(f"row{i}", method="carve", reconstruct=CLOSED_FORM, **fields)
        rows[label] = {"ppl_x_dense": bench.evaluate(out).ppl() / bench.dense.ppl(),
                       "near_tied": api.verify(out, MODEL).near_tie_fraction}
        hf[label] = load_causal_lm(out)
        fast[label] = load_causal_lm(out)
        fast[label].set_experts_implementation(FAST_KERNEL)
        ll[label] = LlamaCppLM(api.export_gguf(str(out), args.work / f"row{i}.gguf", "f16", True).path,
                               n_ctx=PROMPT + NEW + 8, extra_buffers=False)
        print(label, rows[label], flush=True)
    probe = torch.randint(0, hf["dense"].config.vocab_size, (4, PROMPT), generator=torch.Generator().manual_seed(0))
    for client, models in zip(CLIENTS, (hf, fast, ll)):
        speed = measure(models, probe, new_tokens=NEW, compile_backend="inductor" if client == COMPILED else None)
        for label in rows:
            x_dense = ratios(speed[label], speed["dense"])
            rows[label][client] = {what: x_dense[rate] for what, rate in RATES.items()}
    (args.work / "frontier.json").write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1))
    write_docs(rows, cpu_name())


def write_docs(rows: dict, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CLIENTS), figsize=(14, 4), sharey=True)
    for ax, client in zip(axes, CLIENTS):
        for label, r in rows.items():
            ax.scatter([r[client]["prefill"]], [r["ppl_x_dense"]], label=label.split(",")[0] + ", " +
                       label.split(",")[1].strip())
            ax.scatter([r[client]["gen"]], [r["ppl_x_dense"]], marker="x", color=ax.collections[-1].get_facecolor())
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{client}: ● prefill, × generation")
        ax.set_xlabel("tokens/s ÷ dense")
    axes[0].set_ylabel("held-out perplexity ÷ dense")
    axes[-1].legend(fontsize=7)
    fig.suptitle("carve + closed-form reconstruction at 25% active, SmolLM2-135M")
    fig.tight_layout()
    fig.savefig("docs/frontier.png", dpi=110)
    lines = ["### Expert granularity at 25% active: quality against speed", "",
             f"`python bench/bench_frontier.py` (needs `make setup-llama`), alone, on {cpu}, 2 threads. carve with "
             "closed-form reconstruction (no Adam steps), demo held-out; speed ÷ dense in the same client and run "
             f"(prompt {PROMPT} × 4, scored with every position's logits or prefilled with the last one's as "
             f"generation and llama-bench do; generation {NEW} greedy; llama.cpp f16 GGUF with its extra buffer types "
             "off, transformers f32; compiled: "
             f"torch.compile (inductor), each MoE with the {FAST_KERNEL} experts kernel, a static KV cache, the dense "
             "model compiled too, each compiled before it is timed); near-tied as in "
             "`moefy verify` (k-th and (k+1)-th logits within 1e-3 of the token's logit spread). "
             "Plot: docs/frontier.png.", "",
             "| experts | ppl ÷ dense | near-tied | " + " | ".join(f"{c} {what}" for c in CLIENTS
                                                            for what in RATES) + " |",
             "|---|---|---|" + "---|" * len(RATES) * len(CLIENTS)]
    for label, r in rows.items():
        speeds = " | ".join(f"{r[c][what]:.2f}×" for c in CLIENTS for what in RATES)
        lines.append(f"| {label} | ×{r['ppl_x_dense']:.2f} | {r['near_tied']:.1%} | {speeds} |")
    replace_section(Path("docs/results.md"), "frontier", "\n".join(lines))


if __name__ == "__main__":
    main()
