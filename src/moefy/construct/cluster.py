"""Balanced spherical k-means: clusters of exactly prescribed sizes (as k-means-constrained gives),
via Lloyd iterations followed by min-cost balanced assignment rounds."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

# Above this many points the dense n×n assignment gets slow (O(n³)); fall back to a greedy balanced pass.
EXACT_ASSIGNMENT_MAX = 4096


def balanced_kmeans(points: np.ndarray, sizes: list[int], rng: np.random.Generator,
                    iterations: int = 20, balanced_rounds: int = 2) -> np.ndarray:
    """Cluster L2-normalised rows into len(sizes) clusters with exactly those sizes; returns labels."""
    x = _normalise(points.astype(np.float64))
    k = len(sizes)
    if sum(sizes) != len(x):
        raise ValueError("cluster sizes must sum to the number of points")
    centroids = _kmeans_pp(x, k, rng)
    for _ in range(iterations):
        labels = np.argmax(x @ centroids.T, axis=1)
        new = _centroids(x, labels, k, fallback=centroids)
        if np.allclose(new, centroids):
            break
        centroids = new
    labels = None
    for _ in range(balanced_rounds):
        new_labels = _balanced_assign(x @ centroids.T, sizes)
        if labels is not None and (new_labels == labels).all():
            break
        labels = new_labels
        centroids = _centroids(x, labels, k, fallback=centroids)
    return labels


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [int(rng.integers(len(x)))]
    dist = 1.0 - x @ x[chosen[0]]
    for _ in range(1, k):
        p = np.clip(dist, 0, None)
        p = p / p.sum() if p.sum() > 0 else np.full(len(x), 1 / len(x))
        chosen.append(int(rng.choice(len(x), p=p)))
        dist = np.minimum(dist, 1.0 - x @ x[chosen[-1]])
    return x[chosen].copy()


def _centroids(x: np.ndarray, labels: np.ndarray, k: int, fallback: np.ndarray) -> np.ndarray:
    onehot = np.zeros((k, len(x)))
    onehot[labels, np.arange(len(x))] = 1.0
    sums = onehot @ x  # far faster than np.add.at
    empty = onehot.sum(axis=1) == 0
    sums[empty] = fallback[empty]  # keep an emptied cluster where it was; balancing refills it
    return _normalise(sums)


def _balanced_assign(similarity: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Maximise total similarity subject to cluster e receiving exactly sizes[e] points."""
    slots = np.repeat(np.arange(len(sizes)), sizes)
    if len(similarity) <= EXACT_ASSIGNMENT_MAX:
        rows, cols = linear_sum_assignment(-similarity[:, slots])
        labels = np.empty(len(similarity), dtype=np.int64)
        labels[rows] = slots[cols]
        return labels
    return _greedy_assign(similarity, sizes)


def _greedy_assign(similarity: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Best (point, cluster) pairs first, respecting capacities: approximate but exact in sizes."""
    n, k = similarity.shape
    labels = np.full(n, -1, dtype=np.int64)
    room = np.array(sizes)
    for flat in np.argsort(-similarity, axis=None):
        i, e = divmod(int(flat), k)
        if labels[i] < 0 and room[e] > 0:
            labels[i] = e
            room[e] -= 1
    return labels
