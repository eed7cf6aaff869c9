"""Neuron-grouping methods that look at weights or calibration statistics. Pure functions: arrays in, groups out.

Stats keys (see profile/stats.py): abs_mean, top_freq, taylor [D, I]; abs_act [S, I] and hidden [S, H] samples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moefy.construct.cluster import balanced_assign, balanced_kmeans
from moefy.construct.dive import group_moments, keep_top, neuron_scores
from moefy.construct.plan import balanced_sizes
from moefy.construct.recipe import BuildRecipe
from moefy.errors import MoefyError


def _groups(labels: np.ndarray, ids: np.ndarray, k: int) -> list[np.ndarray]:
    return [ids[labels == e] for e in range(k)]


def cluster_split(rows: np.ndarray | torch.Tensor, recipe: BuildRecipe,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """LLaMA-MoE clustering: balanced k-means on L2-normalised rows of up_proj (or gate_proj)."""
    sizes = balanced_sizes(len(rows), recipe.experts)
    labels = balanced_kmeans(rows, sizes, rng, recipe.cluster.iterations, recipe.cluster.balanced_rounds)
    return _groups(labels, np.arange(len(rows)), recipe.experts)


def _markers(abs_act: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """[S, I] -> bool: is neuron j among token s's top fraction by |a|."""
    k = max(1, round(top_fraction * abs_act.shape[1]))
    return torch.zeros_like(abs_act, dtype=torch.bool).scatter_(1, abs_act.topk(k, dim=1).indices, True)


def _domain_weighted(per_domain: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return (per_domain * tokens[:, None]).sum(0) / tokens.sum()


def coactivation_split(stats: dict, recipe: BuildRecipe, rng: np.random.Generator) -> list[np.ndarray]:
    """MoEfication: a balanced partition of the co-activation graph. Each neuron is described by its row of the
    normalised co-activation matrix C = MᵀM (M: sampled tokens × top-activated markers), and rows are grouped by
    balanced k-means, which keeps strongly co-activated neurons in the same part."""
    m = _markers(stats["abs_act"], recipe.profile.top_fraction).float()
    co = (m.T @ m).numpy()
    co /= np.maximum(np.sqrt(np.outer(np.diag(co), np.diag(co))), 1.0)
    return cluster_split(co, recipe, rng)


def shared_count(width: int, fraction: float) -> int:
    return int(round(width * fraction))


def carve_split(stats: dict, recipe: BuildRecipe, rng: np.random.Generator,
                down_norms: torch.Tensor | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """CMoE: the most frequently top-activated neurons become an always-on shared block; the rest are grouped by
    balanced k-means on their activation patterns over the sampled tokens (|a| normalised per token). Given
    `down_norms` [I] (each neuron's down-projection column norm), clustering and refinement scale each neuron's |a|
    by it; the shared block is still chosen by how often |a| alone is in a token's top fraction (weighting that
    choice too measured worse: docs/results.md)."""
    top_freq = _domain_weighted(stats["top_freq"], stats["domain_tokens"])
    width = len(top_freq)
    n_shared = shared_count(width, recipe.shared_fraction)
    order = torch.argsort(top_freq, descending=True).numpy()
    shared, rest = np.sort(order[:n_shared]), np.sort(order[n_shared:])
    if len(rest) < recipe.experts:
        raise MoefyError(f"shared_fraction {recipe.shared_fraction} leaves {len(rest)} neurons for "
                         f"{recipe.experts} experts")
    act = stats["abs_act"] if down_norms is None else stats["abs_act"] * down_norms
    pattern = (act / act.mean(dim=1, keepdim=True).clamp_min(1e-12))[:, rest].T.numpy()  # [I_rest, S]
    sizes = balanced_sizes(len(rest), recipe.experts)
    labels = balanced_kmeans(pattern, sizes, rng, recipe.cluster.iterations, recipe.cluster.balanced_rounds)
    if recipe.cluster.refine_rounds:
        labels = refine_for_routing(labels, act[:, rest].double().numpy(), stats["hidden"].double().numpy(), sizes,
                                    recipe.top_k, recipe.cluster.refine_rounds, recipe.router.ridge)
    return _groups(labels, rest, recipe.experts), shared


def routed_mass(abs_act: np.ndarray, labels: np.ndarray, experts: int) -> np.ndarray:
    """[S, N]: each sampled token's activation mass Σ|a| in each expert."""
    onehot = np.zeros((len(labels), experts))
    onehot[np.arange(len(labels)), labels] = 1.0
    return abs_act @ onehot


def linear_routing(scores: Callable[[np.ndarray], np.ndarray], mass: np.ndarray, top_k: int) -> np.ndarray:
    """[S, N] 0/1: the top-k of a ridge-regressed linear router from the MLP inputs to each token's standardised
    expert mass: the choices a router without hidden layers, as the exported gates are, can make. `scores` is
    ridge_scores(hidden, ·)."""
    target = (mass - mass.mean(1, keepdims=True)) / np.maximum(mass.std(1, keepdims=True), 1e-6)
    chosen = np.argpartition(-scores(target), top_k - 1, axis=1)[:, :top_k]
    routed = np.zeros_like(mass)
    np.put_along_axis(routed, chosen, 1.0, axis=1)
    return routed


def ridge_scores(hidden: np.ndarray, ridge: float) -> Callable[[np.ndarray], np.ndarray]:
    """target [S, N] -> X·W, the fitted values on the same tokens of a ridge regression from X = hidden [S, H]:
    W = (XᵀX + λ·mean(diag XᵀX)·I)⁻¹ Xᵀ target, the penalty relative to the mean feature variance as in the router
    fit. The system is solved once, in the smaller of its primal (H × H) and dual (S × S) forms, which give the same
    values (X(XᵀX + λI)⁻¹Xᵀ = XXᵀ(XXᵀ + λI)⁻¹), so a refinement round is matrix products, not a new H × H solve;
    at 7B's 4,096 inputs the dual form over 2,048 sampled tokens is the smaller. numpy only: scipy's LAPACK brings
    its own BLAS threads, which spin beside numpy's and slowed the whole step on 2 cores."""
    penalty = ridge * np.square(hidden).sum() / hidden.shape[1]
    if len(hidden) < hidden.shape[1]:
        kernel = hidden @ hidden.T
        fitted = np.linalg.solve(kernel + penalty * np.eye(len(kernel)), kernel)  # symmetric: K(K + λI)⁻¹
        return lambda target: fitted @ target
    inverse = np.linalg.inv(hidden.T @ hidden + penalty * np.eye(hidden.shape[1]))
    return lambda target: hidden @ (inverse @ (hidden.T @ target))


def refine_for_routing(labels: np.ndarray, abs_act: np.ndarray, hidden: np.ndarray, sizes: list[int], top_k: int,
                       rounds: int, ridge: float) -> np.ndarray:
    """Make a partition one that a linear router can serve, alternating as k-means does: route the sampled tokens
    with a linear router fitted to the current experts (linear_routing), then give each expert, at its size, the
    neurons that its routed tokens activate most (an exact balanced assignment). Clustering neurons by activation
    pattern alone makes experts an oracle could pick but a linear router often cannot; after reconstruction, half
    of the 50% build's loss was its routing (docs/results.md, routing oracle)."""
    if not rounds:
        return labels
    scores = ridge_scores(hidden, ridge)
    for _ in range(rounds):
        routed = linear_routing(scores, routed_mass(abs_act, labels, len(sizes)), top_k)
        labels = balanced_assign(abs_act.T @ routed, sizes)
    return labels


def importance_split(stats: dict, recipe: BuildRecipe) -> tuple[list[np.ndarray], np.ndarray, bool]:
    """LLaMA-MoE's gradient split: one expert per calibration domain, scored by the Taylor importance
    |a_j·∂L/∂a_j| on that domain. Variants: independent (greedy unique assignment), inner (each expert takes its
    own top neurons, overlapping), inter (neurons in most experts' top sets become a shared block, the rest are
    assigned greedily)."""
    if "taylor" not in stats:
        raise MoefyError("importance needs Taylor scores: profile with profile.taylor=true (--taylor)")
    scores = stats["taylor"].numpy()
    domains, width = scores.shape
    if domains != recipe.experts:
        raise MoefyError(f"importance builds one expert per calibration domain: the corpus has {domains} domains "
                         f"but --experts is {recipe.experts}")
    per_expert = -(-width // recipe.experts)
    if recipe.importance == "inner":
        return [np.sort(np.argsort(-scores[e])[:per_expert]) for e in range(domains)], np.zeros(0, np.int64), True
    shared = np.zeros(0, dtype=np.int64)
    if recipe.importance == "inter":
        n_shared = shared_count(width, recipe.shared_fraction) or per_expert // 2
        tops = np.zeros(width)
        for e in range(domains):
            tops[np.argsort(-scores[e])[:per_expert]] += 1
        # most-chosen first; ties broken by total importance
        shared = np.sort(np.lexsort((-scores.sum(0), -tops))[:n_shared])
    rest = np.setdiff1d(np.arange(width), shared)
    return _greedy_unique(scores[:, rest], rest, balanced_sizes(len(rest), domains)), shared, False


def _greedy_unique(scores: np.ndarray, ids: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Round-robin: each expert in turn takes its highest-scoring neuron not yet taken, until full."""
    k, n = scores.shape
    order = np.argsort(-scores, axis=1)
    taken = np.zeros(n, dtype=bool)
    pos = np.zeros(k, dtype=np.int64)
    groups: list[list[int]] = [[] for _ in range(k)]
    while not taken.all():
        for e in range(k):
            if len(groups[e]) >= sizes[e]:
                continue
            while taken[order[e, pos[e]]]:
                pos[e] += 1
            j = order[e, pos[e]]
            taken[j] = True
            groups[e].append(j)
    return [ids[np.array(g, dtype=np.int64)] for g in groups]


def drop_upcycle_slots(width: int, recipe: BuildRecipe, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Drop-Upcycling: per expert copy, a seeded random drop_fraction of its neurons to re-initialise."""
    if not recipe.drop_fraction:
        return None
    k = int(round(recipe.drop_fraction * width))
    return [np.sort(rng.choice(width, size=k, replace=False)) for _ in range(recipe.experts)]


def dive_experts(stats: dict[str, torch.Tensor], w_down: torch.Tensor, groups: list[list[int]],
                 recipe: BuildRecipe) -> list[np.ndarray]:
    """DIVE: expert e keeps the top `keep` neurons of the FFN pruned on group e's mixed calibration data."""
    return [keep_top(neuron_scores(group_moments(stats, g), w_down, recipe.dive.score), recipe.keep)
            for g in groups]
