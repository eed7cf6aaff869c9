"""Data-filter benchmark (issue: moefy data filter). The demo corpus with synthetic advertisements injected:
filtering throughput with the small scorer (SmolLM2-135M), the heuristic's and a trained fastText classifier's
precision and recall on the injected ads at the default threshold, and training-loss curves of a short training
run on the filtered and on the unfiltered corpus with the same token budget.

Usage: python bench/bench_filter.py [--tokens 16384]"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moefy import api  # noqa: E402
from moefy.data.corpus import load_corpus  # noqa: E402
from moefy.data.scoring.classifier import train_classifier  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import setup  # noqa: E402
from docs_sections import replace_section  # noqa: E402

PRODUCTS = ["wireless earbuds", "memory foam pillow", "vitamin gummies", "LED desk lamp", "running shoes",
            "air fryer", "phone case", "garden hose", "yoga mat", "smart watch"]
TEMPLATES = [
    "Get the best {p} today! Only ${price} — {off}% off. Order now at www.{site}.com or call {phone}.",
    "LIMITED TIME DEAL: {p} for just ${price}. Free shipping on all orders. Click here: https://{site}.shop",
    "Looking for a {p}? Our {p} is the #1 choice. Use promo code SAVE{off} at checkout. Visit {site}.com",
    "{p} SALE {p} SALE. Buy now and save {off}%! Call {phone} today. Don't miss out!",
    "Subscribe to our newsletter for exclusive deals on {p}. ${price} only this week at www.{site}.net",
]


def synthetic_ad(rng: random.Random) -> str:
    t = rng.choice(TEMPLATES)
    return t.format(p=rng.choice(PRODUCTS), price=f"{rng.randint(5, 199)}.{rng.randint(0, 99):02d}",
                    off=rng.choice([10, 20, 30, 50]), site=rng.choice(["bestdeals", "shopnow", "megasale", "topbuy"]),
                    phone=f"{rng.randint(200, 999)}-555-{rng.randint(1000, 9999)}")


def inject(corpus_dir: Path, out: Path, rate: float, seed: int) -> list[dict]:
    """Every document of the corpus, plus one synthetic ad after ~rate of them (same domain), with an is_ad flag."""
    rng = random.Random(seed)
    rows = []
    for doc in load_corpus(corpus_dir).docs:
        rows.append({"text": doc.text, "domain": doc.domain, "is_ad": False})
        if rng.random() < rate:
            rows.append({"text": synthetic_ad(rng), "domain": doc.domain, "is_ad": True})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def precision_recall(rows: list[dict], out: Path) -> tuple[float, float, dict[str, str]]:
    """Of the ad-score drops: precision, recall, and per domain the real documents wrongly flagged."""
    dropped = {d["index"] for d in map(json.loads, (out / "dropped.jsonl").read_text().splitlines())
               if any(r.startswith("ads") for r in d["reasons"])}
    tp = sum(1 for i in dropped if rows[i]["is_ad"])
    ads = sum(r["is_ad"] for r in rows)
    real = Counter(r["domain"] for r in rows if not r["is_ad"])
    wrong = Counter(rows[i]["domain"] for i in dropped if not rows[i]["is_ad"])
    return (tp / len(dropped) if dropped else 0.0), tp / ads, {d: f"{wrong[d]}/{real[d]}" for d in sorted(real)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16_384)
    args = p.parse_args()
    bench = setup(Path(tempfile.mkdtemp(prefix="moefy-filter-bench-")))
    work = bench.work
    rows = inject(work / "corpus" / "calib", work / "injected.jsonl", rate=0.1, seed=0)
    # labelled examples for the classifier: other synthetic ads and held-out demo documents, never the test rows
    rng = random.Random(1)
    labelled = [{"text": synthetic_ad(rng), "label": "ad"} for _ in range(200)]
    labelled += [{"text": d.text, "label": "ok"} for d in load_corpus(work / "corpus" / "heldout").docs]
    (work / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    clf_report = train_classifier(work / "labelled.jsonl", work / "clf", "ad")
    results = {}
    for name, ads in (("heuristic", "heuristic"), ("fastText classifier", str(work / "clf"))):
        out = work / f"filtered-{name.split()[0]}"
        cache = work / f"cache-{name.split()[0]}.jsonl"  # a cold cache each: the throughput counts scoring
        t0 = time.perf_counter()
        summary = api.filter_corpus(work / "injected.jsonl", None, {"ads": {"scorer": ads},
                                                                    "fluency": {"cache": str(cache)}}, out)
        seconds = time.perf_counter() - t0
        results[name] = (summary, seconds, *precision_recall(rows, out))
        print(name, results[name][1:], file=sys.stderr, flush=True)
    # training-loss curves: unfiltered vs filtered (classifier), same MoE (DIVE 4 × 25%, which trains well from a
    # short budget; docs/results.md), budget and seed
    moe = bench.build("moe", method="dive", experts=4, top_k=1, keep=0.25)
    stage = {"trainable": "experts-lora", "tokens": args.tokens, "seq_len": 256, "batch_size": 4, "lr": 1e-3,
             "lora": {"rank": 16, "alpha": 32}}
    curves, heldout = {}, {}
    for name, data in (("unfiltered", work / "injected.jsonl"), ("filtered", work / "filtered-fastText")):
        recipe = work / f"train-{name}.yaml"
        recipe.write_text(json.dumps({"stages": [stage], "checkpoint_every": 10_000}))
        final = api.train(moe, str(data), recipe, work / f"run-{name}")
        curves[name] = [json.loads(line)["loss"] for line in (work / f"run-{name}" / "metrics.jsonl").read_text().splitlines()]
        heldout[name] = bench.evaluate(final)
    Path("docs/img").mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step (1024 tokens)")
    ax.set_ylabel("training loss")
    ax.set_title("experts-lora on a DIVE 4 × 25% SmolLM2 MoE")
    ax.legend()
    fig.savefig("docs/img/filter_training_loss.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    n_docs = len(rows)
    ads = sum(r["is_ad"] for r in rows)
    lines = [
        "## Data filter (`moefy data filter`)",
        "",
        f"Command: `.venv/bin/python bench/bench_filter.py --tokens {args.tokens}`. The demo corpus's `calib/` split "
        f"with {ads} synthetic advertisements injected (templated: products, prices, phone numbers, links, calls to "
        f"action) among {n_docs - ads} real documents, {n_docs} in all. Default cuts: drop each domain's 15% least "
        "fluent documents (SmolLM2-135M perplexity over the first 256 tokens) and every document with ad score > 0.5.",
        "",
        "| ad scorer | documents/s (fluency + ads, cold cache) | ad precision | ad recall | real documents flagged "
        "as ads, per domain | kept | dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (summary, seconds, precision, recall, wrong) in results.items():
        flagged = ", ".join(f"{d} {w}" for d, w in wrong.items())
        lines.append(f"| {name} | {n_docs / seconds:.1f} | {precision:.3f} | {recall:.3f} | {flagged} | "
                     f"{summary['kept']} | {summary['dropped']} |")
    lines += [
        "",
        f"- Classifier (fastText, trained by `moefy data train-classifier` on 200 other synthetic ads and the "
        f"demo `heldout/` documents): on its own held-out split, precision {clf_report.precision:.3f}, recall "
        f"{clf_report.recall:.3f} ({clf_report.heldout_examples} examples).",
        "- Precision counts only ad-score drops; fluency drops are a separate reason in dropped.jsonl. Templated "
        "synthetic ads are easy: these numbers say the machinery works, not how either scorer does on real web ads.",
        "- The heuristic needs no labels, and it flags boilerplate by design: pydoc's navigation-heavy HTML pages "
        "(links, short lines) are where its false positives are. That is why cuts are per domain and `--domains` "
        "names the domains to filter; with labels, the classifier is the better scorer.",
        "- Throughput is dominated by the fluency forward pass (each document's first 256 tokens through "
        "SmolLM2-135M on 2 CPU cores); the ad scorers take milliseconds.",
        "",
        f"Training on filtered vs unfiltered data (same DIVE 4 × 25% MoE, `experts-lora`, {args.tokens:,} tokens, "
        "same seed):",
        "",
        "![training loss](img/filter_training_loss.png)",
        "",
        "| data | mean training loss, last 5 steps | held-out perplexity (demo `heldout/`) |",
        "|---|---|---|",
    ]
    for name, losses in curves.items():
        lines.append(f"| {name} | {sum(losses[-5:]) / 5:.3f} | {heldout[name].ppl():.2f} |")
    lines += ["", "Lower training loss on filtered data partly reflects that the filter removed the hardest text; "
                  "the held-out column is the fairer comparison."]
    replace_section(Path("docs/results.md"), "filter", "\n".join(lines))
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
