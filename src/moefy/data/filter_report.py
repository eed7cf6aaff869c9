"""The filter's report: per-domain kept/dropped counts, a score histogram per score (PNG, one line per domain and its
cut), the 10 highest- and lowest-scored documents per domain and score, malformed-record counts; report.md and
report.json."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moefy.data.records import Record  # noqa: E402

EXAMPLES = 10


def write_report(out: Path, records: list[Record], scores: dict[str, list], reasons: list[list[str]], recipe) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    domains = sorted({r.domain for r in records})
    counts = {d: {"kept": 0, "dropped": 0} for d in domains}
    for r, why in zip(records, reasons):
        counts[r.domain]["dropped" if why else "kept"] += 1
    malformed = Counter(r.problem for r in records if r.problem)
    examples, plots = {}, []
    for score, values in scores.items():
        plots.append(_histogram(out / f"hist_{score}.png", score, records, values, reasons))
        examples[score] = {}
        for d in domains:
            rows = sorted((values[i], i) for i, r in enumerate(records) if r.domain == d and values[i] is not None)
            examples[score][d] = {"highest": [_example(records[i], v) for v, i in rows[::-1][:EXAMPLES]],
                                  "lowest": [_example(records[i], v) for v, i in rows[:EXAMPLES]]}
    summary = {"documents": len(records), "kept": sum(c["kept"] for c in counts.values()),
               "dropped": sum(c["dropped"] for c in counts.values()), "per_domain": counts,
               "malformed": dict(malformed), "reasons": dict(Counter(w.split()[0].rstrip(":") for why in reasons for w in why)),
               "filtered_domains": recipe.domains, "plots": [p.name for p in plots]}
    (out / "report.json").write_text(json.dumps({**summary, "examples": examples}, indent=2))
    (out / "report.md").write_text(_markdown(summary, examples, recipe))
    return summary


def _example(r: Record, value: float) -> dict:
    return {"score": value, "file": r.file, "index": r.index, "text": " ".join(r.text.split())[:200]}


def _histogram(path: Path, score: str, records, values, reasons) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    by_domain: dict[str, list[float]] = {}
    for r, v in zip(records, values):
        if v is not None:
            by_domain.setdefault(r.domain, []).append(v)
    finite = [v for vs in by_domain.values() for v in vs if np.isfinite(v)]
    log = score == "fluency" and finite and min(finite) > 0  # perplexities span orders of magnitude
    data = {d: np.log10(np.clip(vs, 1e-12, 1e300)) if log else np.asarray(vs) for d, vs in by_domain.items()}
    bins = np.histogram_bin_edges(np.concatenate(list(data.values())), bins=30)
    for d, vs in sorted(data.items()):
        ax.hist(vs, bins=bins, histtype="step", label=d)
    ax.set_xlabel(f"log10 {score} (perplexity)" if log else f"{score} score")
    ax.set_ylabel("documents")
    ax.set_title(f"{score}: higher is more likely dropped")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _markdown(summary: dict, examples: dict, recipe) -> str:
    lines = ["# moefy data filter", "",
             f"{summary['documents']} records: {summary['kept']} kept, {summary['dropped']} dropped. "
             f"Filtered domains: {', '.join(recipe.domains) if recipe.domains else 'all'}. Quantile drops: "
             f"{recipe.drop_quantile or 'none'}; absolute thresholds: {recipe.threshold or 'none'}.", ""]
    if summary["malformed"]:
        lines += ["Malformed records (dropped, listed in dropped.jsonl): "
                  + ", ".join(f"{n} {why}" for why, n in summary["malformed"].items()), ""]
    lines += ["| domain | kept | dropped |", "|---|---|---|"]
    lines += [f"| {d} | {c['kept']} | {c['dropped']} |" for d, c in summary["per_domain"].items()]
    lines += [""] + [f"![{p}]({p})" for p in summary["plots"]]
    for score, per_domain in examples.items():
        for d, ex in per_domain.items():
            for which in ("highest", "lowest"):
                lines += ["", f"## {score}, {d}: {which}-scored", ""]
                lines += [f"- {e['score']:.4g} — {e['text']}" for e in ex[which]]
    return "\n".join(lines) + "\n"
