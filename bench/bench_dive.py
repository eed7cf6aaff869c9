"""DIVE against the best training-free method (carve) and LLaMA-MoE's random split (issue: DIVE). SmolLM2-135M,
demo corpus, experts of equal active size at 25% and 50% of FFN active per token: held-out perplexity per domain
training-free; then at 25%, the same training budget for each (DIVE: its `dive` preset; the others: one
`experts-lora` stage); the affinity heatmap, expert overlap and the cost of dropping FLAP's bias compensation.

Usage: python bench/bench_dive.py [--tokens 30000]"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_TOKENS, ratio_cells, setup  # noqa: E402
from docs_sections import replace_section  # noqa: E402

# (label, build fields) per budget; every model has the same FFN neurons active per token.
BUILDS = {
    "25%": [("DIVE 4 experts × 25%, top-1", dict(method="dive", experts=4, top_k=1, keep=0.25)),
            ("carve (shared 1/8 + 8 of 56), fit router", dict(method="carve", experts=56, top_k=8)),
            ("random 2/8 (LLaMA-MoE), random router", dict(method="random", experts=8, top_k=2))],
    "50%": [("DIVE 4 experts × 50%, top-1", dict(method="dive", experts=4, top_k=1, keep=0.5)),
            ("carve (shared 1/8 + 24 of 56), fit router", dict(method="carve", experts=56, top_k=24)),
            ("random 4/8 (LLaMA-MoE), random router", dict(method="random", experts=8, top_k=4))],
}
LORA = {"rank": 16, "alpha": 32}


def training_recipe(method: str, tokens: int) -> dict:
    if method == "dive":  # its own preset: 10% soft-routed routers, then LoRA + routers + norms
        return {"preset": "dive", "tokens": [tokens // 10, tokens - tokens // 10, 0], "seq_len": 256,
                "batch_size": 4, "lr": 1e-3, "lora_rank": LORA["rank"], "checkpoint_every": 10_000}
    return {"stages": [{"name": "lora", "trainable": "experts-lora", "tokens": tokens, "seq_len": 256,
                        "batch_size": 4, "lr": 1e-3, "warmup_steps": 3, "lora": LORA, "router_lr_ratio": 0.01}],
            "checkpoint_every": 10_000}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=30_000)
    args = p.parse_args()
    bench = setup(Path(tempfile.mkdtemp(prefix="moefy-dive-bench-")))
    rows, mining = [], None
    for budget, builds in BUILDS.items():
        for label, fields in builds:
            moe = bench.build(f"{fields['method']}-{budget[:2]}", **fields)
            free = bench.evaluate(moe)
            trained = None
            if budget == "25%":
                final = bench.train(moe, f"{fields['method']}-{budget[:2]}",
                                    training_recipe(fields["method"], args.tokens))
                trained = bench.evaluate(final)
            if fields["method"] == "dive" and budget == "25%":
                mining = json.loads((moe / "dive" / "mining.json").read_text())
                Path("docs/img").mkdir(parents=True, exist_ok=True)
                for png in ("affinity.png", "dendrogram.png"):
                    shutil.copy2(moe / "dive" / png, Path("docs/img") / f"dive_{png}")
            rows.append((budget, label, free, trained))
            print(f"{budget} {label}: ×{free.ppl() / bench.dense.ppl():.3g}"
                  + (f" → ×{trained.ppl() / bench.dense.ppl():.3g}" if trained else ""), file=sys.stderr, flush=True)
    replace_section(Path("docs/results.md"), "dive", report(bench, rows, mining, args.tokens))
    print(f"work dir: {bench.work}")


def report(bench, rows, mining: dict, tokens: int) -> str:
    domains = list(bench.dense.per_domain)
    head = "| budget | construction | " + " | ".join(domains) + " | overall |"
    rule = "|---|---|" + "---|" * len(domains) + "---|"
    lines = [
        "## DIVE vs carve vs random split (SmolLM2-135M, demo corpus)",
        "",
        f"Command: `.venv/bin/python bench/bench_dive.py --tokens {tokens}`. Calibration: 4096 tokens per demo "
        "domain (DIVE holds out every 5th document of each domain for its cross-domain loss). Held-out perplexity "
        f"on `heldout/` ({EVAL_TOKENS} tokens per domain), as a multiple of dense. Every model at a budget has the "
        "same FFN neurons active per token.",
        "",
        "### Training-free",
        "",
        head, rule,
        "| | dense (absolute ppl) | " + " | ".join(f"{bench.dense.ppl(d):.2f}" for d in domains)
        + f" | {bench.dense.ppl():.2f} |",
    ]
    lines += [f"| {b} | {label} | " + " | ".join(ratio_cells(free, bench.dense)) + " |" for b, label, free, _ in rows]
    lines += [
        "",
        f"### After the same training budget ({tokens:,} tokens, 25% active)",
        "",
        "DIVE trains with its `dive` preset (10% of the budget: routers alone under dense soft routing at T=1; 90%: "
        f"LoRA r={LORA['rank']} on experts + routers + norms, sparse top-1, lr 1e-3). carve and random train one "
        "`experts-lora` stage (same LoRA and norms at lr 1e-3; routers at 1% of their own RMS per step, which "
        "carve's tiny fitted routers need) for the whole budget.",
        "",
        head + " gap recovered |", rule + "---|",
    ]
    for b, label, free, trained in rows:
        if trained is not None:
            lines.append(f"| {b} | {label} | " + " | ".join(ratio_cells(trained, bench.dense))
                         + f" | {bench.gap_recovered(free, trained):.0%} |")
    trained = {label.split()[0]: t for b, label, _, t in rows if t is not None}
    overall = {k: t.ppl() / bench.dense.ppl() for k, t in trained.items()}
    lines += ["", f"Verdict at this budget: DIVE {'beats' if overall['DIVE'] < overall['random'] else 'does not beat'} "
              f"the random split (×{overall['DIVE']:.3g} vs ×{overall['random']:.3g}) and "
              f"{'beats' if overall['DIVE'] < overall['carve'] else 'does not beat'} carve, the best training-free "
              f"method (×{overall['DIVE']:.3g} vs ×{overall['carve']:.3g})."]
    comp = mining["bias_compensation"]
    lines += [
        "",
        "### DIVE's mining at 25%",
        "",
        f"Groups (one expert each): {mining['groups']}. Affinity = mean of mask IoU and cross-domain loss affinity.",
        "",
        "![affinity](img/dive_affinity.png) ![dendrogram](img/dive_dendrogram.png)",
        "",
        "Expert overlap (mean over layers): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                          mining["expert_overlap"]["mean"].items()) + ".",
        "",
        "FLAP's bias compensation (pruned neurons replaced by their calibration mean, i.e. a bias W_down·E[a]) cannot "
        "be stored in Mixtral or Qwen2-MoE experts, which have no output bias. What dropping it costs, per domain, "
        "for the FFN pruned on that domain alone (held-out loss → perplexity):",
        "",
        "| domain | dense | pruned, no bias (what we export) | pruned + FLAP bias |",
        "|---|---|---|---|",
    ]
    lines += [f"| {d} | {math.exp(c['dense']):.2f} | {math.exp(c['pruned']):.2f} | {math.exp(c['pruned_with_bias']):.2f} |"
              for d, c in comp.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
