"""Write the routing analysis as JSON (every number), Markdown (summary) and HTML (tables + plots)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from moefy.analyze import plots
from moefy.analyze.routing import LayerRouting


def write_report(out: Path, model: str, layers: list[LayerRouting], domains: list[str], tokens: dict[str, int],
                 top_k: int, num_experts: int) -> dict[str, Path]:
    mean_distance = np.mean([np.array(lr.distance) for lr in layers], axis=0)
    summary = {
        d: {"entropy": float(np.mean([lr.entropy[d] for lr in layers])),
            "top1_confidence": float(np.mean([lr.top1_confidence[d] for lr in layers])),
            "imbalance_cv": float(np.mean([lr.imbalance_cv[d] for lr in layers])),
            "specialisation": float(np.mean([lr.specialisation[d] for lr in layers]))}
        for d in domains}
    data = {"model": model, "domains": domains, "tokens": tokens, "top_k": top_k, "num_experts": num_experts,
            "summary": summary, "mean_domain_distance": mean_distance.tolist(),
            "layers": [lr.to_dict() for lr in layers]}
    (out / "routing.json").write_text(json.dumps(data, indent=1))
    images = {
        "load": plots.load_heatmaps(layers, domains, out / "load_heatmaps.png"),
        "distance": plots.distance_heatmap(mean_distance, domains, "L2 distance of expert load (mean over layers)",
                                           out / "domain_distance.png"),
        "specialisation": plots.per_layer_lines(layers, domains, "specialisation", "distance from average load",
                                                out / "specialisation.png"),
        "entropy": plots.per_layer_lines(layers, domains, "entropy", "router entropy (nats)", out / "entropy.png"),
    }
    rows = [(d, s["entropy"], s["top1_confidence"], s["imbalance_cv"], s["specialisation"], tokens[d])
            for d, s in summary.items()]
    header = ("domain", "router entropy", "top-1 confidence", "load CV", "specialisation", "tokens")
    md = [f"# Routing analysis: {model}", "",
          f"{num_experts} experts, top-{top_k}, {len(layers)} MoE layers; means over layers.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += [f"| {d} | {e:.3f} | {c:.3f} | {v:.3f} | {s:.3f} | {t} |" for d, e, c, v, s, t in rows]
    md += ["", "Domain × domain L2 distance of expert load (mean over layers):", "",
           "| | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    md += [f"| {d} | " + " | ".join(f"{x:.3f}" for x in mean_distance[i]) + " |" for i, d in enumerate(domains)]
    md += ["", *[f"![{k}]({p.name})" for k, p in images.items()]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    table = "".join(f"<tr><td>{html.escape(d)}</td><td>{e:.3f}</td><td>{c:.3f}</td><td>{v:.3f}</td><td>{s:.3f}</td>"
                    f"<td>{t}</td></tr>" for d, e, c, v, s, t in rows)
    figures = "".join(f'<figure><img src="{p.name}" alt="{k}"><figcaption>{k}</figcaption></figure>'
                      for k, p in images.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>moefy routing analysis</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>Routing analysis: {html.escape(model)}</h1>
<p>{num_experts} experts, top-{top_k}, {len(layers)} MoE layers; numbers are means over layers. All numbers:
<a href="routing.json">routing.json</a>.</p>
<table><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>{table}</table>{figures}</body></html>"""
    (out / "report.html").write_text(page)
    return {"html": out / "report.html", "markdown": out / "report.md", "json": out / "routing.json", **images}
