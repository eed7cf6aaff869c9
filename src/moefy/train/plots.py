"""PNG plots of a training run from its metrics.jsonl: loss curves and domain weights over steps."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moefy.train.logs import METRICS  # noqa: E402


def plot_run(run: Path) -> list[Path]:
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["loss"] for r in records], label="LM loss")
    if any(r["aux_loss"] for r in records):
        ax.plot(steps, [r["aux_loss"] for r in records], label="aux (balance + z) loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    loss_png = run / "loss.png"
    fig.savefig(loss_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for d in records[0]["weights"]:
        ax.plot(steps, [r["weights"][d] for r in records], label=d)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("domain weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    weights_png = run / "domain_weights.png"
    fig.savefig(weights_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [loss_png, weights_png]
