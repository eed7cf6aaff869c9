"""PNG plots for the routing report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moefy.analyze.routing import LayerRouting  # noqa: E402


def load_heatmaps(layers: list[LayerRouting], domains: list[str], path: Path) -> Path:
    """One panel per domain: layer × expert load."""
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 0.18 * len(layers) + 2), squeeze=False)
    vmax = max(max(v) for lr in layers for v in lr.load.values())
    for ax, d in zip(axes[0], domains):
        grid = np.array([lr.load[d] for lr in layers])
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(d)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), [str(lr.layer) for lr in layers], fontsize=6)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="fraction of routed slots")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def distance_heatmap(matrix: np.ndarray, domains: list[str], title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.0 * len(domains) + 2.5, 1.0 * len(domains) + 1.5))
    im = ax.imshow(matrix, cmap="magma")
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    bright = matrix.max() * 0.6 if matrix.max() > 0 else 1.0
    for i in range(len(domains)):
        for j in range(len(domains)):  # dark text on the bright end of magma, light text on the dark end
            ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="k" if matrix[i, j] > bright else "w")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def per_layer_lines(layers: list[LayerRouting], domains: list[str], field: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = [lr.layer for lr in layers]
    for d in domains:
        ax.plot(xs, [getattr(lr, field)[d] for lr in layers], marker="o", ms=3, label=d)
    ax.set_xlabel("layer")
    ax.set_xticks(xs if len(xs) <= 16 else xs[:: max(1, len(xs) // 15)])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def dendrogram_plot(linkage: np.ndarray, labels: list[str], path: Path) -> Path:
    """The average-linkage dendrogram of 1 − affinity (the grouping DIVE cuts into experts), from its merge tree."""
    from scipy.cluster.hierarchy import dendrogram

    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(labels) + 2), 3.5))
    if len(labels) > 1:
        dendrogram(linkage, labels=labels, ax=ax, leaf_rotation=45)
    ax.set_ylabel("1 − affinity (average linkage)")
    ax.set_title("domain grouping")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def reconstruction_plot(fits: list, path: Path) -> Path:
    """Each MoE layer's normalised error as built and after layer-wise reconstruction (log scale)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    layers = [f.layer for f in fits]
    ax.semilogy(layers, [f.before for f in fits], "o-", label="as built")
    ax.semilogy(layers, [f.after for f in fits], "o-", label="reconstructed")
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised MSE of the MoE layer")
    ax.set_title("layer-wise reconstruction (calibration inputs from the converted model)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
