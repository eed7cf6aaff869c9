"""Layer-wise reconstruction (issue: near-lossless conversion). SmolLM2-135M, demo corpus: training-free held-out
perplexity of carve and DIVE builds with and without `--reconstruct` (and its variants), at 25% and 50% of FFN
neurons active; the expert and neuron oracles on the same held-out data; a corpus construction never saw; and the
reconstruction's time against one profiling pass, measured in the same run. Writes docs/results.md.

Usage: python bench/bench_reconstruct.py [--quick | --variants | --half | --self | --seeds | --refine |
                                          --refine-free]
(--quick: the default rows only; --variants: what the Adam steps train, at 25%; --half: the split of the active half
between shared and routed; --self: the demo calibration with and without text sampled from the model itself; --seeds:
make demo's split with today's defaults, built with several seeds, for the spread that one build's figure carries;
--refine: the same builds, and the best 50% split, with carve's partition refined for its routers; --refine-free:
carve's defaults without reconstruction, its partition as clustered and refined)"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from moefy import api
from moefy.construct.plan import load_plan
from moefy.construct.recipe import BuildRecipe, ReconstructOptions
from moefy.construct.reconstruct import reconstruct
from moefy.data.corpus import load_corpus
from moefy.export.oracle import active_fraction, expert_oracle, neuron_oracle
from moefy.families import family_for
from moefy.models import load_causal_lm
from moefy.profile.options import ProfileOptions
from moefy.profile.perplexity import heldout_perplexity
from moefy.profile.runner import profile
from moefy.recipes import deep_merge, validate_recipe
from moefy.sources import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    CALIB, EVAL_TOKENS, MODEL, SELF_TOKENS, dense_row, ratio_cells, setup, unseen_perplexity, with_self,
)
from docs_sections import replace_section  # noqa: E402

CARVE25 = dict(method="carve", experts=56, top_k=8)
CARVE50 = dict(method="carve", experts=56, top_k=24)
DEMO25 = dict(method="carve", experts=28, top_k=4)
DIVE25 = dict(method="dive", experts=4, top_k=1, keep=0.25)
# The tables up to --self were measured with the routers held fixed during the Adam steps, the default then; the
# --self table's last rows measure training them (train_router, the default since).
REC = {"enabled": True, "train_router": False}
# (label, recipe fields); the default reconstruction first, then the variants that lost, for the record.
CLOSED = {**REC, "steps": 0}
ROWS = [
    ("25%", "carve (defaults)", CARVE25),
    ("25%", "carve + reconstruction (defaults: closed form + 300 Adam steps per layer)",
     {**CARVE25, "reconstruct": REC}),
    ("25%", "carve + reconstruction, closed form only", {**CARVE25, "reconstruct": CLOSED}),
    ("25%", "carve + reconstruction, closed form only, target = dense FFN output",
     {**CARVE25, "reconstruct": {**CLOSED, "target": "ffn"}}),
    ("25%", "DIVE 4 × 25%, top-1", DIVE25),
    ("25%", "DIVE 4 × 25%, top-1 + reconstruction (defaults)", {**DIVE25, "reconstruct": REC}),
    ("50%", "carve (defaults)", CARVE50),
    ("50%", "carve + reconstruction (defaults)", {**CARVE50, "reconstruct": REC}),
]
QUICK = {1, 7}
# --variants: what the Adam steps train, and how much calibration data they get (carve 25%, default first).
VARIANTS = [
    ("25%", "carve + reconstruction (defaults: every expert weight trains)", {**CARVE25, "reconstruct": REC}),
    ("25%", "↳ low-rank deltas instead, rank 128 per layer's stacked experts",
     {**CARVE25, "reconstruct": {**REC, "delta_rank": 128}}),
    ("25%", "↳ low-rank deltas instead, rank 32", {**CARVE25, "reconstruct": {**REC, "delta_rank": 32}}),
    ("25%", "↳ twice the calibration tokens (16,384 per domain)",
     {**CARVE25, "reconstruct": {**REC, "tokens_per_domain": 16384}}),
    ("25%", "↳ Adam lr 2% of each tensor's RMS instead of 1%", {**CARVE25, "reconstruct": {**REC, "lr_ratio": 0.02}}),
    # the ridge, on the closed form alone (its default, 1e-3, is the reconstruction table's 'closed form only' row)
    *[("25%", f"↳ closed form only, ridge {r:g}", {**CARVE25, "reconstruct": {**CLOSED, "ridge": r}})
      for r in (1e-4, 1e-2, 1e-1)],
]
# --half: at 50% active, how the active half is split between the shared block and routed experts (carve defaults:
# a shared eighth), and the best split with twice the calibration tokens. Each row computes 768 of the 1536 neurons
# per token.
HALF = [
    ("50%", "carve + reconstruction (defaults: shared 1/8 + 24 of 56 × 24)", {**CARVE50, "reconstruct": REC}),
    ("50%", "↳ shared 1/4 + 16 of 48 × 24", dict(method="carve", experts=48, top_k=16, shared_fraction=0.25,
                                                  reconstruct=REC)),
    ("50%", "↳ shared 3/8 + 8 of 40 × 24", dict(method="carve", experts=40, top_k=8, shared_fraction=0.375,
                                                 reconstruct=REC)),
    *[("50%", f"↳ shared 3/8 + 8 of 40 × 24, {times} the calibration tokens ({tokens:,} per domain)",
       dict(method="carve", experts=40, top_k=8, shared_fraction=0.375,
            reconstruct={**REC, "tokens_per_domain": tokens})) for times, tokens in (("twice", 16384),
                                                                                      ("four times", 32768))],
]

# --self: the demo calibration with text sampled from SmolLM2 itself beside it (`moefy data generate`), against the
# demo calibration alone, at 25% and at the best 50% split. WITH_SELF in a row's fields stands for that corpus.
WITH_SELF = {"calib": "demo calib/ + self.jsonl"}
# more sampled text, split into domains of SELF_TOKENS each (`moefy data generate --domains`), so that each one
# gets a full per-domain budget
WITH_SELF2 = {"calib": "demo calib/ + 2 sampled domains"}
WITH_SELF4 = {"calib": "demo calib/ + 4 sampled domains"}
SAMPLED_DOMAINS = {WITH_SELF["calib"]: 1, WITH_SELF2["calib"]: 2, WITH_SELF4["calib"]: 4}
HALF38 = dict(method="carve", experts=40, top_k=8, shared_fraction=0.375)
REC16K = {**REC, "tokens_per_domain": 16384}
SELF = [
    ("25%", "carve + reconstruction (defaults), demo calibration", {**CARVE25, "reconstruct": REC}),
    ("25%", f"↳ + {SELF_TOKENS:,} tokens sampled from SmolLM2 as a fifth domain",
     {**CARVE25, "reconstruct": REC, **WITH_SELF}),
    ("50%", "shared 3/8 + 8 of 40 × 24 + reconstruction, 16,384 tokens per domain, demo calibration",
     {**HALF38, "reconstruct": REC16K}),
    ("50%", f"↳ + {SELF_TOKENS:,} tokens sampled from SmolLM2 as a fifth domain",
     {**HALF38, "reconstruct": REC16K, **WITH_SELF}),
    # what else might reach ×1.15 at 50%, each on top of the row above
    ("50%", "↳ + sampled, 600 Adam steps per layer instead of 300",
     {**HALF38, "reconstruct": {**REC16K, "steps": 600}, **WITH_SELF}),
    ("50%", "↳ + sampled, routers refit in closed form on the converted model's inputs",
     {**HALF38, "reconstruct": {**REC16K, "router": True}, **WITH_SELF}),
    ("50%", "↳ + sampled, shared 7/16 + 4 of 36 × 24", dict(method="carve", experts=36, top_k=4,
                                                             shared_fraction=0.4375, reconstruct=REC16K, **WITH_SELF)),
    ("50%", "↳ + sampled, the Adam steps train the routers too (train_router)",
     {**HALF38, "reconstruct": {**REC16K, "train_router": True}, **WITH_SELF}),
    ("50%", "↳ + sampled, shared 15/32 + 2 of 34 × 24, train_router",
     dict(method="carve", experts=34, top_k=2, shared_fraction=0.46875,
          reconstruct={**REC16K, "train_router": True}, **WITH_SELF)),
    # finer experts (12 neurons instead of 24) at the two best shared blocks
    ("50%", "↳ + sampled, shared 7/16 + 8 of 72 × 12, train_router",
     dict(method="carve", experts=72, top_k=8, shared_fraction=0.4375,
          reconstruct={**REC16K, "train_router": True}, **WITH_SELF)),
    ("50%", "↳ + sampled, shared 3/8 + 16 of 80 × 12, train_router",
     dict(method="carve", experts=80, top_k=16, shared_fraction=0.375,
          reconstruct={**REC16K, "train_router": True}, **WITH_SELF)),
    # make demo's split at 25%, with and without router training
    ("25%", "carve 28 × 48 top-4 (make demo) + reconstruction + sampled, routers held fixed",
     {**DEMO25, "reconstruct": REC, **WITH_SELF}),
    ("25%", "↳ the Adam steps train the routers too (train_router)",
     {**DEMO25, "reconstruct": {**REC, "train_router": True}, **WITH_SELF}),
    # more sampled text at make demo's split (the defaults, train_router on)
    ("25%", "↳ train_router, profile samples of 8,192 tokens instead of 2,048 (for the clustering and the router fit)",
     {**DEMO25, "reconstruct": {**REC, "train_router": True}, "profile": {**CALIB, "sample_tokens": 8192},
      **WITH_SELF}),
    ("25%", f"↳ train_router, 2 × {SELF_TOKENS:,} sampled tokens as two domains",
     {**DEMO25, "reconstruct": {**REC, "train_router": True}, **WITH_SELF2}),
    ("25%", f"↳ train_router, 4 × {SELF_TOKENS:,} sampled tokens as four domains",
     {**DEMO25, "reconstruct": {**REC, "train_router": True}, **WITH_SELF4}),
]

# --seeds: make demo's split with the reconstruction defaults of today (train_router on), on the demo calibration,
# once per build seed. The seed draws the calibration tokens of profiling and reconstruction, carve's clustering and
# the Adam steps' batches, so the rows differ the way two users' builds of one recipe would.
SEEDS = [("25%", f"carve 28 × 48 top-4 + shared (make demo's split) + reconstruction, seed {seed}",
          {**DEMO25, "reconstruct": {"enabled": True}, "seed": seed}) for seed in (0, 1, 2)]

# --refine: carve's partition refined for the router that picks from it (cluster.refine_rounds, the default since),
# at make demo's split with the --seeds table's seeds, and at the best 50% split; today's defaults otherwise.
REFINE = [*[("25%", f"carve 28 × 48 top-4 + shared (make demo's split), refined partition + reconstruction, "
                    f"seed {seed}", {**DEMO25, "reconstruct": {"enabled": True}, "seed": seed}) for seed in (0, 1, 2)],
          ("50%", "shared 3/8 + 8 of 40 × 24, refined partition + reconstruction, 16,384 tokens per domain, seed 0",
           {**HALF38, "reconstruct": {"enabled": True, "tokens_per_domain": 16384}})]
# Every table here was measured with carve's neurons sized by |a| alone (cluster.measure = activation), and every
# table before --refine with carve's partition as clustered too: the defaults then. bench_refine_variants.py
# weighted-refine measured today's measure, output.
ACTIVATION = {"cluster": {"measure": "activation"}}
UNREFINED = {"cluster": {"measure": "activation", "refine_rounds": 0}}
# --refine-free: the refinement alone, without reconstruction, at carve's defaults (and the two partitions' oracles).
FREE = [("25%", "carve (defaults), partition as clustered", {**CARVE25, **UNREFINED}),
        ("25%", "carve (defaults), refined partition", CARVE25)]
REFINED_TABLES = (REFINE, FREE)  # the tables that leave carve's refinement at its default

# option -> (rows, docs/results.md section, title suffix)
TABLES = {"": (ROWS, "reconstruction", ""), "variants": (VARIANTS, "reconstruction-variants", ": variants"),
          "half": (HALF, "reconstruction-half", ": 50% active"),
          "self_calib": (SELF, "reconstruction-self", ": calibration text sampled from the model"),
          "seeds": (SEEDS, "reconstruction-seeds", ": the spread over build seeds"),
          "refine": (REFINE, "reconstruction-refine", ": carve's partition refined for its routers"),
          "refine_free": (FREE, "reconstruction-refine-free", ": carve's refined partition without reconstruction")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="only the default reconstruction rows")
    p.add_argument("--variants", action="store_true", help="the reconstruction variants' table instead "
                   "(docs/results.md, section reconstruction-variants)")
    p.add_argument("--half", action="store_true", help="the 50%% active variants instead (section reconstruction-half)")
    p.add_argument("--self", action="store_true", dest="self_calib", help="calibration with text sampled from the "
                   "model itself instead (section reconstruction-self)")
    p.add_argument("--seeds", action="store_true", help="make demo's split built with seeds 0, 1 and 2 instead "
                   "(section reconstruction-seeds)")
    p.add_argument("--refine", action="store_true", help="the --seeds builds and the best 50%% split with carve's "
                   "partition refined for its routers instead (section reconstruction-refine)")
    p.add_argument("--refine-free", action="store_true", help="carve's defaults without reconstruction, partition "
                   "as clustered and refined, instead (section reconstruction-refine-free)")
    args = p.parse_args()
    table = next((name for name in TABLES if name and getattr(args, name)), "")
    rows, section, title = TABLES[table]
    flag = f" --{table.removesuffix('_calib').replace('_', '-')}" if table else ""
    work = Path(tempfile.mkdtemp(prefix="moefy-reconstruct-"))
    bench = setup(work)
    unseen = bench.unseen

    def unseen_ppl(model) -> float:
        return unseen_perplexity(model, bench.tokenizer, unseen)

    source = resolve_model(MODEL)
    dense_model = load_causal_lm(source.directory)
    dense_unseen = unseen_ppl(dense_model)
    family, calib = family_for(source.config()), load_corpus(bench.calib)
    t0 = time.perf_counter()  # one profiling pass over the same calibration tokens, uncached, for the time ratio
    profile(source, family, calib, ProfileOptions(**CALIB), 0, work / "profile")
    profile_s, reconstruct_s = time.perf_counter() - t0, float("nan")
    sampled = {}  # corpus placeholder -> its directory, sampled when a row first needs it

    def calib_for(fields: dict) -> dict:
        name = fields.get("calib")
        if name not in SAMPLED_DOMAINS:
            return {}
        if name not in sampled:
            n = SAMPLED_DOMAINS[name]
            sampled[name] = str(with_self(Path(bench.calib), work / f"calib-self{n}", n))
        return {"calib": sampled[name]}
    lines = [
        f"## Layer-wise reconstruction{title} (SmolLM2-135M, demo corpus)",
        "",
        f"Command: `.venv/bin/python bench/bench_reconstruct.py{flag}`. "
        "Same calibration (4096 tokens per domain of "
        f"`calib/`) and held-out data ({EVAL_TOKENS} tokens per domain of `heldout/`) as the construction table; "
        "cells are perplexity / dense. 'unseen' is a corpus construction never saw: the READMEs of the Python "
        "packages installed in the venv (8192 tokens). Oracles are computed inside the dense model on the same "
        "held-out data (export/oracle.py). Reconstruction defaults: target = the dense model's residual stream, "
        "the construction's routers kept, down projections solved in closed form (ridge 1e-3), then 300 Adam steps "
        "on every expert weight per layer (512 tokens a step, lr 1% of each tensor's RMS); 8192 tokens per domain."
        + (f" '↳ + sampled' rows add a fifth calibration domain, {SELF_TOKENS:,} tokens sampled from SmolLM2 itself "
           "(`moefy data generate smollm2-135m --tokens 16384`: 64 texts of 256 tokens, each from a random first "
           "token at temperature 1, seed 0), to profiling, router fit and reconstruction alike." if rows is SELF
           else "")
        + (" These rows use today's default instead, where the Adam steps train the routers too (train_router), "
           "and no sampled text. Each row is one build seed: it draws the calibration tokens of profiling and "
           "reconstruction, carve's clustering and the Adam steps' batches." if rows in (SEEDS, REFINE) else "")
        + (" carve's partition is then refined for its routers (`--cluster-refine-rounds`, default 5): each round "
           "fits a linear router to the experts' activation mass on the profile's sampled tokens and re-assigns "
           "every neuron to the experts whose routed tokens use it most." if rows in REFINED_TABLES else ""),
        "",
        "| budget | model | " + " | ".join(bench.dense.per_domain) + " | overall | unseen | build s |",
        "|---|---|" + "---|" * len(bench.dense.per_domain) + "---|---|---|",
        dense_row(bench.dense, "100% | dense (absolute ppl)", extra=(f"{dense_unseen:.2f}", "")),
    ]
    ratios = []  # (held-out overall, unseen) ÷ dense per built row, for the seeds table's spread
    for n, (budget, label, fields) in enumerate(rows):
        if args.quick and n not in QUICK:
            continue
        t0 = time.perf_counter()
        calib_fields = calib_for(fields)
        pinned = ACTIVATION if rows in REFINED_TABLES else UNREFINED
        recipe = validate_recipe(BuildRecipe, deep_merge({"model": MODEL, "calib": bench.calib, "profile": CALIB,
                                                          **pinned}, {**fields, **calib_fields}))
        result = api.build(recipe, work / "moe", overwrite=True)
        seconds = time.perf_counter() - t0
        moe = load_causal_lm(work / "moe")
        ppl = heldout_perplexity(moe, bench.tokenizer, bench.held, seq_len=256, tokens_per_domain=EVAL_TOKENS)
        ratios.append((ppl.ppl() / bench.dense.ppl(), unseen_ppl(moe) / dense_unseen))
        lines.append(f"| {budget} | {label} | " + " | ".join(ratio_cells(ppl, bench.dense))
                     + f" | ×{ratios[-1][1]:.3g} | {seconds:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
        if not fields.get("reconstruct"):  # the oracles of this partition, once per construction
            plan = load_plan(work / "moe")
            oracles = [("expert oracle of this partition", expert_oracle(dense_model, plan))]
            if label.startswith("carve"):
                oracles.append((f"neuron oracle at {active_fraction(plan):.0%} active",
                                neuron_oracle(dense_model, active_fraction(plan))))
            for name, oracle in oracles:
                with oracle:
                    ppl = heldout_perplexity(dense_model, bench.tokenizer, bench.held, seq_len=256,
                                             tokens_per_domain=EVAL_TOKENS)
                    lines.append(f"| {budget} | ↳ {name} | " + " | ".join(ratio_cells(ppl, bench.dense))
                                 + f" | ×{unseen_ppl(dense_model) / dense_unseen:.3g} | |")
        if label == "carve (defaults)" and budget == "25%":  # the closed form alone, timed against profiling
            t0 = time.perf_counter()
            reconstruct(load_plan(work / "moe"), source, family, calib, ReconstructOptions(**CLOSED), 0)
            reconstruct_s = time.perf_counter() - t0
        if result.reconstruction:
            fits = result.reconstruction
            print(f"  layer nMSE {sum(f.before for f in fits) / len(fits):.3f} → "
                  f"{sum(f.after for f in fits) / len(fits):.3f}", file=sys.stderr)
    if reconstruct_s == reconstruct_s:  # measured (not NaN): this run had the carve 25% row
        lines += ["", f"Time: the closed-form reconstruction of carve 25% (30 layers, 32k calibration tokens) took "
                  f"{reconstruct_s:.0f} s, {reconstruct_s / profile_s:.2f}× one profiling pass over 16k tokens "
                  f"({profile_s:.0f} s), both in this run; the Adam steps make up the rest of 'build s'. 'build s' "
                  "is planning, reconstruction and writing: the calibration profile is cached by the library, so it "
                  "is paid once, before these rows. Measured alone on the 2-core machine."]
    if rows in (SEEDS, REFINE):  # the seeds' rows are the first three
        lines += ["", "Spread over the seeds, (largest − smallest) ÷ mean: " + ", ".join(
            f"{name} {(max(v) - min(v)) / (sum(v) / len(v)):.1%} (×{min(v):.3g} to ×{max(v):.3g})"
            for name, v in zip(("held-out", "unseen"), zip(*ratios[:3]))) + "."]
    replace_section(Path("docs/results.md"), section, "\n".join(lines))
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
