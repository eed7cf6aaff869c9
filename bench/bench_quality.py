"""Training-free quality table (issue: data-driven construction). SmolLM2-135M, demo corpus: calibrate on calib/,
evaluate held-out perplexity per domain on heldout/, at 25% and 50% of FFN neurons active per token (shared neurons
count as active). Writes docs/results.md.

Usage: python bench/bench_quality.py [--tokens-per-domain 2048] [--out docs/results.md]"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from moefy import api
from moefy.construct.recipe import BuildRecipe
from moefy.data.corpus import load_corpus
from moefy.data.demo_corpus import build_demo_corpus
from moefy.export.oracle import active_fraction, neuron_oracle
from moefy.models import load_causal_lm, load_tokenizer
from moefy.profile.perplexity import heldout_perplexity
from moefy.recipes import validate_recipe
from moefy.sources import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from docs_sections import replace_section  # noqa: E402

MODEL = "smollm2-135m"
FIT = {"kind": "fit"}
# (label, recipe fields) per budget. SmolLM2's FFN has 1536 neurons: 25% = 384 active, 50% = 768.
CONFIGS = {
    "25%": [
        ("random 2/8, random router (LLaMA-MoE)", dict(method="random", experts=8, top_k=2)),
        ("cluster 2/8, random router", dict(method="cluster", experts=8, top_k=2)),
        ("cluster 2/8, fit router", dict(method="cluster", experts=8, top_k=2, router=FIT)),
        ("coactivation 2/8, fit router", dict(method="coactivation", experts=8, top_k=2, router=FIT)),
        ("importance independent 1/4, fit router", dict(method="importance", experts=4, top_k=1, router=FIT)),
        ("importance inner 1/4, fit router", dict(method="importance", importance="inner", experts=4, top_k=1,
                                                  router=FIT)),
        ("carve S1A1E8 (shared 1/8 + 1 of 7), fit router", dict(method="carve", experts=7, top_k=1)),
        ("carve (defaults: shared 1/8 + 8 of 56)", dict(method="carve", experts=56, top_k=8)),
    ],
    "50%": [
        ("random 4/8, random router (LLaMA-MoE)", dict(method="random", experts=8, top_k=4)),
        ("cluster 4/8, random router", dict(method="cluster", experts=8, top_k=4)),
        ("cluster 4/8, fit router", dict(method="cluster", experts=8, top_k=4, router=FIT)),
        ("coactivation 4/8, fit router", dict(method="coactivation", experts=8, top_k=4, router=FIT)),
        ("importance independent 2/4, fit router", dict(method="importance", experts=4, top_k=2, router=FIT)),
        ("importance inner 2/4, fit router", dict(method="importance", importance="inner", experts=4, top_k=2,
                                                  router=FIT)),
        ("importance inter (shared 1/3 + 1 of 4), fit router", dict(method="importance", importance="inter",
                                                                    experts=4, top_k=1, shared_fraction=1 / 3,
                                                                    router=FIT)),
        ("carve (defaults: shared 1/8 + 24 of 56)", dict(method="carve", experts=56, top_k=24)),
    ],
    # Upcycled experts are full FFN copies: one active expert is already 100% of the FFN per token.
    "100%": [("upcycle 8 copies, top-1 (scale 1)", dict(method="upcycle", experts=8, top_k=1))],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens-per-domain", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moefy-quality-"))
    build_demo_corpus(work / "corpus")
    calib, held = str(work / "corpus" / "calib"), load_corpus(work / "corpus" / "heldout")
    source = resolve_model(MODEL)

    tok = load_tokenizer(source.directory)

    def evaluate(model):
        return heldout_perplexity(model, tok, held, seq_len=256, tokens_per_domain=args.tokens_per_domain)

    dense_model = load_causal_lm(source.directory)
    dense = evaluate(dense_model)
    rows = {"dense": ("dense", 1.0, dense, None)}
    for budget, fraction in (("25%", 0.25), ("50%", 0.5)):  # the oracle masks neurons inside the dense model
        with neuron_oracle(dense_model, fraction):
            rows[f"{budget} oracle: each token's own top-{budget} neurons by |a| (neuron-level bound)"] = (
                budget, fraction, evaluate(dense_model), None)
    del dense_model
    for budget, configs in CONFIGS.items():
        for label, fields in configs:
            recipe = validate_recipe(BuildRecipe, {"model": MODEL, "calib": calib, **fields,
                                                   "profile": {"tokens_per_domain": 4096}})
            t0 = time.perf_counter()
            result = api.build(recipe, work / "moe", overwrite=True)
            seconds = time.perf_counter() - t0
            ppl = evaluate(load_causal_lm(work / "moe"))
            rows[f"{budget} {label}"] = (budget, active_fraction(result.plan), ppl, (result.architecture, seconds))
            print(f"{budget} {label}: ×{ppl.ppl() / dense.ppl():.2f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    write_table(args.out, rows, dense, args.tokens_per_domain)
    (work / "results.json").write_text(json.dumps({k: {"per_domain_loss": v[2].per_domain} for k, v in rows.items()}))
    print(f"wrote {args.out}")


def write_table(out: Path, rows: dict, dense, tokens_per_domain: int) -> None:
    domains = list(dense.per_domain)
    lines = [
        "## Training-free quality (SmolLM2-135M, demo corpus)",
        "",
        "Command: `make results` (= `.venv/bin/python bench/bench_quality.py`). Calibration on the demo corpus's "
        f"`calib/` split, held-out perplexity on `heldout/` ({tokens_per_domain} tokens per domain, context 256, "
        "sliding windows sharing one token). Calibration: 4096 tokens per domain (16k in all). Entries are "
        "perplexity relative to dense (×); absolute dense perplexity in the "
        "first row. 'active' counts shared neurons; zero padding neurons are not counted. The demo corpus is a demo, "
        "not a benchmark.",
        "",
        "| budget | construction | active FFN | " + " | ".join(domains) + " | overall | format |",
        "|---|---|---|" + "---|" * len(domains) + "---|---|",
    ]
    for name, (budget, active, ppl, info) in rows.items():
        if name == "dense":
            cells = [f"{ppl.ppl(d):.2f}" for d in domains] + [f"{ppl.ppl():.2f}"]
            lines.append("| 100% | dense (absolute perplexity) | 100% | " + " | ".join(cells) + " | LlamaForCausalLM |")
            continue
        cells = [f"×{ppl.ppl(d) / dense.ppl(d):.3g}" for d in domains] + [f"**×{ppl.ppl() / dense.ppl():.3g}**"]
        label = name.split(" ", 1)[1]
        fmt = info[0] if info else "(dense + per-token mask)"
        lines.append(f"| {budget} | {label} | {active:.0%} | " + " | ".join(cells) + f" | {fmt} |")
    replace_section(out, "construction", "\n".join(lines))


if __name__ == "__main__":
    main()
