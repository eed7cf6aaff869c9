"""DIVE's algorithms as pure functions (DESIGN §4): structured FFN neuron scores per domain from the profiler's
moments, keep masks, domain affinity (mask IoU, cross-domain loss), agglomerative grouping of domains into experts,
and the overlap between the resulting experts.

Moments combine exactly across domains (token-weighted E[a] and E[a²]), so a group's score is the score of its mixed
calibration data without another pass over it."""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform


def group_moments(stats: dict[str, torch.Tensor], domains: list[int]) -> dict[str, torch.Tensor]:
    """Token-weighted mean, E[a²] and Taylor score over the listed domains: the stats of their mixed data."""
    w = stats["domain_tokens"][domains].double()
    w = w / w.sum()
    out = {k: (stats[k][domains].double() * w[:, None]).sum(0) for k in ("mean", "sq_mean")}
    if "taylor" in stats:
        out["taylor"] = (stats["taylor"][domains].double() * w[:, None]).sum(0)
    return out


def neuron_scores(moments: dict[str, torch.Tensor], w_down: torch.Tensor, metric: str) -> torch.Tensor:
    """[I] structured score of each FFN neuron j (a_j = silu(g_j·x)·(u_j·x), W_down [H, I]).

    flap:   Var(a_j)·‖W_down[:, j]‖²  (FLAP's fluctuation: how much the output moves if j is replaced by its mean)
    wanda:  ‖a_j‖₂·Σ_i |W_down[i, j]|  (Wanda-sp: weight magnitude times input norm, per output-structure)
    taylor: E|a_j·∂L/∂a_j|            (first-order loss change of removing j)"""
    col = w_down.double()
    if metric == "flap":
        var = (moments["sq_mean"] - moments["mean"] ** 2).clamp_min(0)
        return var * col.pow(2).sum(0)
    if metric == "wanda":
        return moments["sq_mean"].clamp_min(0).sqrt() * col.abs().sum(0)
    if metric == "taylor":
        return moments["taylor"]
    raise ValueError(f"unknown score {metric!r}")


def keep_top(scores: torch.Tensor, keep: float) -> np.ndarray:
    """Indices of the top `keep` fraction of neurons (sorted), ties broken by index for determinism."""
    n = max(1, round(keep * scores.shape[0]))
    order = np.lexsort((np.arange(scores.shape[0]), -scores.numpy()))
    return np.sort(order[:n])


def mask_iou(masks: list[list[np.ndarray]], width: int) -> np.ndarray:
    """[D, D] mean over layers of the IoU of kept-neuron sets; masks[layer][domain] = kept indices."""
    d = len(masks[0])
    total = np.zeros((d, d))
    for layer in masks:
        dense = np.zeros((d, width), dtype=bool)
        for i, kept in enumerate(layer):
            dense[i, kept] = True
        inter = dense.astype(np.int64) @ dense.T.astype(np.int64)
        sizes = dense.sum(1)
        total += inter / (sizes[:, None] + sizes[None, :] - inter)
    return total / len(masks)


def loss_affinity(losses: np.ndarray) -> np.ndarray:
    """[D, D] affinity from cross-domain losses L[i, j] (model pruned on i, evaluated on j): how close i's
    sub-network comes to j's own on j's data, L[j, j] / L[i, j], symmetrised. 1 on the diagonal."""
    ratio = np.diag(losses)[None, :] / losses
    return np.clip((ratio + ratio.T) / 2, 0, 1)


def group_domains(affinity: np.ndarray, n_groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering on 1 − affinity, cut at exactly n_groups; groups ordered by their
    first domain, so the result does not depend on label numbering."""
    d = affinity.shape[0]
    if n_groups > d:
        raise ValueError(f"cannot make {n_groups} groups from {d} domains")
    if n_groups == d:
        return [[i] for i in range(d)]
    dist = 1 - (affinity + affinity.T) / 2
    np.fill_diagonal(dist, 0)
    labels = cut_tree(linkage(squareform(dist.clip(0), checks=False), "average"), n_clusters=n_groups).ravel()
    groups = [sorted(np.flatnonzero(labels == c).tolist()) for c in range(n_groups)]
    return sorted(groups)


def dendrogram_linkage(affinity: np.ndarray) -> np.ndarray:
    dist = 1 - (affinity + affinity.T) / 2
    np.fill_diagonal(dist, 0)
    return linkage(squareform(dist.clip(0), checks=False), "average")


def overlap_stats(experts: list[np.ndarray], width: int) -> dict[str, float]:
    """How much the experts of one layer share: mean pairwise IoU, and the fraction of FFN neurons in no expert, in
    exactly one, and in every expert."""
    dense = np.zeros((len(experts), width), dtype=bool)
    for e, kept in enumerate(experts):
        dense[e, kept] = True
    count = dense.sum(0)
    n = len(experts)
    pairs = [(dense[a] & dense[b]).sum() / (dense[a] | dense[b]).sum() for a in range(n) for b in range(a + 1, n)]
    return {"mean_pairwise_iou": float(np.mean(pairs)) if pairs else 1.0, "uncovered": float((count == 0).mean()),
            "in_one": float((count == 1).mean()), "in_all": float((count == n).mean())}
