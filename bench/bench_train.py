"""Training benchmarks (issue: moefy train). SmolLM2-135M and the demo corpus.

throughput: training tokens/s of an 8-expert top-2 MoE (random split, Mixtral) against the dense SmolLM2, same
  batch, every parameter training, steps interleaved in one process; with the ideal ratio of matmul FLOPs.
recovery: from the best training-free 25% build (carve defaults), train a fixed token budget with each of
  `router`, `router+norm` and `experts-lora` (and `norm`, the demo's set); held-out perplexity per domain before
  and after, and the fraction of the log-perplexity gap to dense that was recovered.

distill: from carve + layer-wise reconstruction (25%, or --start half: the best 50% build), the same experts-lora
  stage trained with LM loss, with distillation from the dense teacher, and with both, at equal tokens; with
  --trainable experts (repeatable), also the full expert weights instead of LoRA; with --sampled, the stages train on
  the demo text and 4 domains of text sampled from SmolLM2 itself (the build is unchanged).

Usage: python bench/bench_train.py [--part throughput|recovery|distill|all] [--tokens 30000]
    [--objective lm|kl|kl+lm]... [--start carve25|half] [--trainable experts-lora|experts]... [--sampled]
(distill at a budget other than 30,000 tokens writes its own section, so the runs at 30k and 200k stand side by side)"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moefy import api
from moefy.construct.recipe import BuildRecipe
from moefy.demo import SAMPLED_DOMAINS  # --sampled: as many sampled domains as make demo trains on
from moefy.evaluate.speed import matmul_params
from moefy.export.card import param_count
from moefy.models import load_causal_lm
from moefy.recipes import validate_recipe
from moefy.sources import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    EVAL_TOKENS, MODEL, SELF_TOKENS, dense_row, ratio_cells, setup, unseen_perplexity, with_self,
)
from docs_sections import replace_section  # noqa: E402

# Routers step at 1% of their own RMS per step (router_lr_ratio): carve's fitted routers have RMS ~5e-4, and any
# absolute lr that suits norms or LoRA scrambles them (router lr 1e-4 alone gave ×40, 1e-3 with norms ×18).
RECOVERY_SETS = {
    # the absolute router learning rates that motivated router_lr_ratio
    "router (absolute lr)": {"trainable": "router", "lr": 1e-4},
    "router+norm (absolute lr)": {"trainable": "router+norm", "lr": 1e-3},
    "norm": {"lr": 2e-3},
    "router": {"lr": 1e-3, "router_lr_ratio": 0.01},
    "router+norm": {"lr": 2e-3, "router_lr_ratio": 0.01},
    "experts-lora": {"lr": 1e-3, "router_lr_ratio": 0.01, "lora": {"rank": 16, "alpha": 32}},
}


NOTES = [
    "",
    "- The issue asks for 200k tokens. The 56-expert carve model trains at roughly 100 tokens/s on this 2-core CPU, "
    "so 200k tokens is over half an hour per set; 30k is what fit in a session. `--tokens 200000` runs the full "
    "budget.",
    "- 'routers at 0.01×RMS' = `router_lr_ratio: 0.01`: each router steps by 1% of its own RMS. The two 'absolute lr' "
    "rows train the routers at the stage lr instead: carve's fitted routers have RMS ~5e-4, and Adam moves every "
    "weight by about lr per step.",
]


def throughput(work: Path, batch: int = 4, seq_len: int = 256, repeats: int = 5) -> str:
    recipe = validate_recipe(BuildRecipe, {"model": MODEL, "experts": 8, "top_k": 2, "method": "random"})
    api.build(recipe, work / "moe-random", overwrite=True)
    models = {"dense": load_causal_lm(resolve_model(MODEL).directory), "moe 8/2": load_causal_lm(work / "moe-random")}
    models["moe 8/2"].set_experts_implementation("grouped_mm")
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    ids = torch.randint(0, 49152, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in models}
    for r in range(repeats + 1):  # the first round warms up allocators and is dropped
        for name, model in models.items():
            model.train()
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if r:
                times[name].append(time.perf_counter() - t0)
    tps = {k: ids.numel() / statistics.median(v) for k, v in times.items()}
    (d_active, _), (m_active, m_total) = (matmul_params(models[k]) for k in models)
    ratio = tps["moe 8/2"] / tps["dense"]
    head = models["dense"].lm_head.weight.numel()  # the LM head's matmul is per token too, in both models
    return "\n".join([
        "## Training throughput (`moefy train`)",
        "",
        "Command: `.venv/bin/python bench/bench_train.py --part throughput` (part of `make bench`). SmolLM2-135M vs "
        "an 8-expert top-2 random "
        f"split of it (Mixtral, `grouped_mm` experts), batch {batch} × {seq_len} tokens, every parameter training "
        f"(forward + backward + AdamW step), fp32 on CPU, median of {repeats} interleaved steps after one warm-up.",
        "",
        "| model | training tokens/s relative to dense | decoder matmul params active per token |",
        "|---|---|---|",
        f"| dense SmolLM2 | 1.00× | {param_count(d_active)} |",
        f"| MoE 8 experts top-2 | {ratio:.2f}× | {param_count(m_active)} of {param_count(m_total)} |",
        "",
        f"- Ideal ratio from FLOPs (per-token matmul params incl. the {param_count(head)}-param LM head, dense / MoE): "
        f"{(d_active + head) / (m_active + head):.2f}×; decoder layers alone: {d_active / m_active:.2f}×. "
        f"Measured: {ratio:.2f}×.",
        "- Each token's expert work is top-2 of 8 eighth-width experts = a quarter of the dense FFN. Attention, the "
        "LM head and the routing itself (top-k, sorting tokens by expert, scattering back) do not shrink, and on this "
        "CPU the grouped matmul runs below dense GEMM efficiency.",
    ])


def recovery(work: Path, tokens: int) -> str:
    bench = setup(work)
    moe = bench.build("carve25", method="carve", experts=56, top_k=8)
    before = bench.evaluate(moe)
    rows = {}
    for name, fields in RECOVERY_SETS.items():
        stage = {"name": name.split()[0], "trainable": name, "tokens": tokens, "seq_len": 256, "batch_size": 4,
                 "warmup_steps": 3, **fields}
        final = bench.train(moe, name.replace(" ", "-"), {"stages": [stage], "checkpoint_every": 10_000})
        rows[name] = (fields, bench.evaluate(final))
        print(f"{name}: ×{rows[name][1].ppl() / bench.dense.ppl():.2f}", file=sys.stderr, flush=True)
    domains = list(bench.dense.per_domain)
    lines = [
        "## Recovery training at 25% FFN active (`moefy train`)",
        "",
        f"Command: `.venv/bin/python bench/bench_train.py --part recovery --tokens {tokens}`. Start: the best "
        "training-free 25% build (carve defaults: shared 1/8 + 8 of 56 routed, fit routers, 16k calibration tokens). "
        f"Each trainable set trains {tokens:,} tokens on the demo corpus's `calib/` split (seq 256, batch 4, AdamW, "
        "cosine to 10%, 3 warm-up steps); held-out perplexity on `heldout/` "
        f"({EVAL_TOKENS} tokens per domain). Cells: perplexity / dense; 'gap recovered' = 1 − log(ppl/dense) after "
        "÷ before.",
        "",
        "| model | lr | " + " | ".join(domains) + " | overall | gap recovered |",
        "|---|---|" + "---|" * len(domains) + "---|---|",
        dense_row(bench.dense, lead=1, extra=("",)),
        "| carve 25%, training-free | | " + " | ".join(ratio_cells(before, bench.dense)) + " | 0% |",
    ]
    for name, (fields, ppl) in rows.items():
        extra = f", LoRA r={fields['lora']['rank']}" if "lora" in fields else ""
        if "router_lr_ratio" in fields:
            extra += f", routers at {fields['router_lr_ratio']:g}×RMS"
        label = f"`{fields.get('trainable', name)}`" + (" (routers at the absolute lr)" if "absolute" in name else "")
        lines.append(f"| + {label}{extra} | {fields['lr']:g} | " + " | ".join(ratio_cells(ppl, bench.dense))
                     + f" | {bench.gap_recovered(before, ppl):.0%} |")
    lines += NOTES
    return "\n".join(lines)


# --trainable key: (how a row names it, the stage fields it sets). Full weights train at a tenth of LoRA's lr: Adam
# moves every weight by about lr per step, while a LoRA delta starts at zero and grows through the product of two
# small factors.
TRAINABLES = {"experts-lora": ("LoRA r=16 on experts, routers at 1% of their RMS, norms; lr 1e-3",
                               {"trainable": "experts-lora", "lr": 1e-3, "router_lr_ratio": 0.01,
                                "lora": {"rank": 16, "alpha": 32}}),
              "experts": ("full expert weights, routers at 1% of their RMS, norms; lr 1e-4",
                          {"trainable": "experts", "lr": 1e-4, "router_lr_ratio": 0.01})}
# --objective key: (row label, the stage fields it sets)
OBJECTIVES = {"lm": ("LM loss", {}),
              "kl": ("distillation (KL, T=1)", {"distill": {"temperature": 1.0}}),
              "kl+lm": ("distillation + LM loss (KL, T=1, LM weight 1)",
                        {"distill": {"temperature": 1.0, "lm_weight": 1.0}})}


# --start key: (the start's label, its build's recipe fields)
STARTS = {"carve25": ("carve 25% + reconstruction",
                      {"method": "carve", "experts": 56, "top_k": 8, "reconstruct": {"enabled": True}}),
          # the best 50% build of docs/results.md (reconstruction-half), seed 0
          "half": ("50%: shared 3/8 + 8 of 40 × 24 + reconstruction, 16,384 tokens per domain",
                   {"method": "carve", "experts": 40, "top_k": 8, "shared_fraction": 0.375,
                    "reconstruct": {"enabled": True, "tokens_per_domain": 16384}})}


def distill_stage(tokens: int, objective: str, trainable: str = "experts-lora") -> dict:
    """The stage a distillation row trains: one of TRAINABLES with one of OBJECTIVES."""
    return {"name": "recovery", "tokens": tokens, "seq_len": 256, "batch_size": 4, "warmup_steps": 3,
            **TRAINABLES[trainable][1], **OBJECTIVES[objective][1]}


def distillation(work: Path, tokens: int, objectives: list[str], start: str = "carve25",
                 trainables: tuple[str, ...] = ("experts-lora",), sampled: bool = False) -> str:
    """From carve + reconstruction, the same stage with each objective (and each trainable set), at equal tokens;
    `sampled`: trained on the demo text and text sampled from the dense model, the build unchanged."""
    bench = setup(work)
    data = str(with_self(Path(bench.calib), work / "calib-self", SAMPLED_DOMAINS)) if sampled else None
    start_label, start_fields = STARTS[start]
    moe = bench.build(start, **start_fields)
    before = bench.evaluate(moe)
    domains = list(bench.dense.per_domain)
    unseen = bench.unseen

    dense_unseen = unseen_perplexity(load_causal_lm(resolve_model(MODEL).directory), bench.tokenizer, unseen)

    def unseen_ratio(model_dir: Path) -> str:
        return f"×{unseen_perplexity(load_causal_lm(model_dir), bench.tokenizer, unseen) / dense_unseen:.3g}"
    lines = [
        f"## Distillation recovery after reconstruction, {tokens:,} tokens"
        + ("" if start == "carve25" else f", from the {start} start")
        + ("" if list(trainables) == ["experts-lora"] else ", " + " vs ".join(f"`{t}`" for t in trainables))
        + (", on demo and sampled text" if sampled else "") + " (`moefy train`)",
        "",
        f"Command: `.venv/bin/python bench/bench_train.py --part distill --tokens {tokens}"
        + (f" --start {start}" if start != "carve25" else "")
        + "".join(f" --objective {o}" for o in objectives if objectives != list(OBJECTIVES))
        + "".join(f" --trainable {t}" for t in trainables if list(trainables) != ["experts-lora"])
        + (" --sampled" if sampled else "")
        + f"`. Start: {start_label} (defaults otherwise). Each row trains "
        + " or ".join(f"`{t}` ({TRAINABLES[t][0]})" for t in trainables)
        + f", cosine, 3 warm-up steps; seq 256, batch 4, for {tokens:,} tokens "
        + (f"drawn from `calib/` and from {SAMPLED_DOMAINS} × {SELF_TOKENS:,} tokens sampled from SmolLM2 itself "
           f"(`moefy data generate --domains {SAMPLED_DOMAINS}`, seed 0; uniform mixture over the {SAMPLED_DOMAINS} "
           "+ 4 domains, so half the training tokens are sampled text; the build calibrates on `calib/` only)"
           if sampled else "of `calib/`")
        + ", changing only the "
        + ("objective" if len(trainables) == 1 else "objective and the trainable set")
        + "; the teacher is the dense SmolLM2 (fp32 on CPU), run per "
        "batch. Held-out perplexity / dense on `heldout/`; 'unseen' is the reconstruction table's corpus that neither "
        "construction nor training sees (the installed packages' READMEs, 8192 tokens); tokens/s is the median "
        "training step rate (alone on the machine), so 'per wall-second' comparisons can be read off it.",
        "",
        "| model | " + " | ".join(domains) + " | overall | unseen | gap recovered | train tokens/s |",
        "|---|" + "---|" * len(domains) + "---|---|---|---|",
        dense_row(bench.dense, extra=(f"{dense_unseen:.2f}", "", "")),
        f"| {start_label}, training-free | " + " | ".join(ratio_cells(before, bench.dense))
        + f" | {unseen_ratio(moe)} | 0% | |",
    ]
    for trainable, key in ((t, o) for t in trainables for o in objectives):
        name = OBJECTIVES[key][0] + ("" if len(trainables) == 1 else f", `{trainable}`")
        tag = f"{trainable}-{key.replace('+', '-')}"
        final = bench.train(moe, tag, {"stages": [distill_stage(tokens, key, trainable)], "checkpoint_every": 10_000},
                            data)
        ppl = bench.evaluate(final)
        metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
        rate = statistics.median(m["tokens_per_s"] for m in metrics)
        lines.append(f"| + {name} | " + " | ".join(ratio_cells(ppl, bench.dense))
                     + f" | {unseen_ratio(final)} | {bench.gap_recovered(before, ppl):.0%} | {rate:.0f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


# --stage of --part save-dtype: (what both rows train, the stage at a token budget)
SAVE_DTYPE_STAGES = {
    "experts-lora": ("the same `experts-lora` stage with distillation + LM loss (KL, T=1, LM weight 1): LoRA r=16 on "
                     "experts, routers at 1% of their RMS, norms; lr 1e-3",
                     lambda tokens: distill_stage(tokens, "kl+lm")),
    # the smallest updates any stage makes, so the most that rounding to bf16 at the end could undo
    "router": ("the routers alone on the LM loss, each stepping by 1% of its own RMS (`router_lr_ratio: 0.01`)",
               lambda tokens: {"name": "router", "trainable": "router", "tokens": tokens, "seq_len": 256,
                               "batch_size": 4, "warmup_steps": 3, **RECOVERY_SETS["router"]}),
}


def save_dtype(work: Path, tokens: int, kind: str) -> str:
    """What writing the trained model in bf16 costs: a bf16 build (the dtype released checkpoints come in) trains the
    same stage once per `dtype` of the train recipe, same seed, so the runs differ only in how RUN/final is
    written. Training itself runs in fp32 either way."""
    bench = setup(work)
    start_label, start_fields = STARTS["carve25"]
    moe = bench.build("carve25-bf16", **start_fields, dtype="bfloat16")
    before = bench.evaluate(moe)
    domains = list(bench.dense.per_domain)
    trains, stage = SAVE_DTYPE_STAGES[kind]
    lines = [
        f"## Writing a trained bf16 MoE in bf16 or fp32, {kind}, {tokens:,} tokens (`moefy train`)",
        "",
        f"Command: `.venv/bin/python bench/bench_train.py --part save-dtype --stage {kind} --tokens {tokens}`. "
        f"Start: {start_label} (defaults otherwise), built with `dtype: bfloat16`. Both rows train {trains}; cosine, "
        f"3 warm-up steps, seq 256, batch 4, {tokens:,} tokens of `calib/`, in fp32 and with the same seed. They "
        "differ only in the train recipe's `dtype`, the dtype RUN/final is written in. Held-out perplexity / dense "
        "on `heldout/`, evaluated in fp32.",
        "",
        "| model | " + " | ".join(domains) + " | overall | RUN/final size |",
        "|---|" + "---|" * len(domains) + "---|---|",
        dense_row(bench.dense, extra=("",)),
        f"| {start_label}, bf16, training-free | " + " | ".join(ratio_cells(before, bench.dense)) + " | |",
    ]
    for dtype, label in (("source", "written in bf16 (`dtype: source`, the default)"),
                         ("float32", "written in fp32 (`dtype: float32`)")):
        final = bench.train(moe, f"{kind}-{dtype}", {"stages": [stage(tokens)], "checkpoint_every": 10_000,
                                                     "dtype": dtype})
        size = sum(f.stat().st_size for f in final.glob("model*.safetensors")) / 2**20
        lines.append(f"| + `{kind}`, {label} | " + " | ".join(ratio_cells(bench.evaluate(final), bench.dense))
                     + f" | {size:.0f} MiB |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["throughput", "recovery", "distill", "save-dtype", "all"], default="all")
    p.add_argument("--tokens", type=int, default=30_000)
    p.add_argument("--objective", action="append", choices=list(OBJECTIVES),
                   help="distill: the objectives to compare (repeatable; default all)")
    p.add_argument("--start", choices=list(STARTS), default="carve25", help="distill: the build it trains from")
    p.add_argument("--trainable", action="append", choices=list(TRAINABLES),
                   help="distill: the trainable sets to compare (repeatable; default experts-lora)")
    p.add_argument("--sampled", action="store_true", help="distill: train on the demo text and text sampled from "
                   f"SmolLM2 itself ({SAMPLED_DOMAINS} domains of {SELF_TOKENS:,} tokens), the build unchanged")
    p.add_argument("--stage", choices=list(SAVE_DTYPE_STAGES), default="experts-lora",
                   help="save-dtype: the stage both rows train")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moefy-train-bench-"))
    if args.part in ("throughput", "all"):
        replace_section(Path("docs/benchmarks.md"), "train-throughput", throughput(work))
    if args.part in ("recovery", "all"):
        replace_section(Path("docs/results.md"), "train-recovery", recovery(work, args.tokens))
    if args.part in ("distill", "all"):
        # each token budget keeps its own table: the 200k run does not replace the 30k comparison
        section = "train-distill" if args.tokens == 30_000 else f"train-distill-{args.tokens}"
        section += "" if args.start == "carve25" else f"-{args.start}"
        trainables = tuple(args.trainable or ["experts-lora"])
        section += ("" if trainables == ("experts-lora",) else "-" + "-".join(trainables)) + "-sampled" * args.sampled
        table = distillation(work, args.tokens, args.objective or list(OBJECTIVES), args.start, trainables,
                             args.sampled)
        replace_section(Path("docs/results.md"), section, table)
    if args.part == "save-dtype":  # not in "all": it answers one question, at the cost of two training runs
        section = "train-save-dtype" + ("" if args.stage == "experts-lora" else f"-{args.stage}")
        replace_section(Path("docs/results.md"), section, save_dtype(work, args.tokens, args.stage))
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
