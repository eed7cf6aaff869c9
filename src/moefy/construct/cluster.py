"""Balanced spherical k-means: clusters of exactly prescribed sizes (as k-means-constrained gives),
via Lloyd iterations followed by rounds of exact balanced assignment (an auction on cluster prices)."""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np
import torch

Matmul = Callable[[np.ndarray, np.ndarray], np.ndarray]


def balanced_kmeans(points: np.ndarray | torch.Tensor, sizes: list[int], rng: np.random.Generator,
                    iterations: int = 20, balanced_rounds: int = 3) -> np.ndarray:
    """Cluster L2-normalised rows into len(sizes) clusters with exactly those sizes; returns labels. A bf16
    tensor (a bf16 checkpoint's rows as stored) also makes Lloyd's assignment a bf16 matmul (_nearest).

    float32 rows are never normalised or copied (others are copied once to float32): a row's scale does not change
    which centroid is nearest, so the Lloyd steps compare raw dot products, and the normalisation enters as a
    per-row weight where it matters (the centroid sums, k-means++, the auction). At a 7B layer (11,008 × 4,096) a
    float64 normalised copy made three fresh 360 MB arrays, each allocated and page-faulted anew
    (docs/benchmarks.md, "Across model sizes")."""
    bf16 = isinstance(points, torch.Tensor) and points.dtype == torch.bfloat16 and _bf16_units()
    x = points.float().numpy() if isinstance(points, torch.Tensor) else np.asarray(points, dtype=np.float32)
    inv_norm = 1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)), 1e-12)
    k = len(sizes)
    # The bf16 path multiplies in torch, so the rest of it does too (_torch_matmul); float32 rows keep numpy's
    # matmuls, and with them the float order, and so the partitions, that docs/results.md measured.
    mm = _torch_matmul if bf16 else np.matmul
    centroids, labels, sums = _lloyd(x, inv_norm, _kmeans_pp(x, inv_norm, k, rng, mm), iterations,
                                     points if bf16 else None, mm)
    balanced = None
    for _ in range(balanced_rounds):
        new_labels = balanced_assign(_similarity(x, inv_norm, centroids, mm), sizes)
        if balanced is not None and (new_labels == balanced).all():
            break
        _move(x, inv_norm, sums, labels, new_labels, mm)
        labels = balanced = new_labels
        centroids = _unit_sums(sums, np.bincount(labels, minlength=k), fallback=centroids)
    return balanced


def _similarity(x: np.ndarray, inv_norm: np.ndarray, centroids: np.ndarray, mm: Matmul = np.matmul) -> np.ndarray:
    """[n, k] cosine similarity of each row to each (unit) centroid, in float64 for the auction."""
    return mm(x, centroids.T.astype(np.float32)).astype(np.float64) * inv_norm[:, None]


def _torch_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b through torch. numpy's OpenBLAS threads spin-wait after each call and torch's OpenMP threads after
    theirs, so on a 2-core machine alternating the two slowed every step of the bf16 path, the small ones most."""
    return (torch.from_numpy(a) @ torch.from_numpy(b)).numpy()


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _kmeans_pp(x: np.ndarray, inv_norm: np.ndarray, k: int, rng: np.random.Generator,
               mm: Matmul = np.matmul) -> np.ndarray:
    chosen = [int(rng.integers(len(x)))]
    dist = 1.0 - _similarity(x, inv_norm, _unit_row(x, inv_norm, chosen[0]), mm)[:, 0]
    for _ in range(1, k):
        p = np.clip(dist, 0, None)
        p = p / p.sum() if p.sum() > 0 else np.full(len(x), 1 / len(x))
        chosen.append(int(rng.choice(len(x), p=p)))
        dist = np.minimum(dist, 1.0 - _similarity(x, inv_norm, _unit_row(x, inv_norm, chosen[-1]), mm)[:, 0])
    return np.concatenate([_unit_row(x, inv_norm, i) for i in chosen])


def _unit_row(x: np.ndarray, inv_norm: np.ndarray, i: int) -> np.ndarray:
    return x[i: i + 1].astype(np.float64) * inv_norm[i]


def _lloyd(x: np.ndarray, inv_norm: np.ndarray, centroids: np.ndarray, iterations: int,
           xb: torch.Tensor | None = None, mm: Matmul = np.matmul) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lloyd's iterations, each assignment followed by the centroids of its clusters, until the centroids stop
    moving; returns the last centroids, labels and cluster sums. The sums follow only the rows that change cluster
    (_move): after the first few iterations few rows do, so an iteration is one pass over the layer (the
    assignment) where it used to be two (docs/benchmarks.md, "Across model sizes"). The labels are the same as with
    sums recomputed, up to float order in a near-tie. `xb`, the same rows in bf16, makes the assignment a bf16
    matmul (_nearest)."""
    k = len(centroids)
    labels = sums = None
    for _ in range(iterations):
        new_labels = _nearest(x, inv_norm, centroids, xb)
        if sums is None:
            sums = _sums(x, inv_norm, new_labels, k, mm=mm)
        else:
            _move(x, inv_norm, sums, labels, new_labels, mm)
        labels = new_labels
        new = _unit_sums(sums, np.bincount(labels, minlength=k), fallback=centroids)
        if np.allclose(new, centroids):
            break
        centroids = new
    return centroids, labels, sums


def _move(x: np.ndarray, inv_norm: np.ndarray, sums: np.ndarray, labels: np.ndarray, new_labels: np.ndarray,
          mm: Matmul = np.matmul) -> None:
    """Update the cluster sums in place for the rows whose label changes from `labels` to `new_labels`."""
    moved = np.flatnonzero(new_labels != labels)
    sums += _sums(x[moved], inv_norm[moved], new_labels[moved], len(sums), leaving=labels[moved], mm=mm)


def _bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, AMX); elsewhere bf16 matmuls are slower than float32."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def _nearest(x: np.ndarray, inv_norm: np.ndarray, centroids: np.ndarray, xb: torch.Tensor | None) -> np.ndarray:
    """Each row's nearest centroid by dot product (the rows' scale does not change it), as the float32 matmul
    gives it. With `xb` (the same rows, exactly, in bf16), the scores come from one bf16 matmul with float32
    accumulation, several times faster on a CPU with bf16 units (bench/bench_build.py, cluster). The centroids are
    split into a bf16 high part and a bf16 remainder, so a score differs from float32 by at most the bf16 rounding
    of the two outputs (2^-8 of the score, 2^-16 of the row's norm) and the remainder's own rounding (2^-16 of the
    row's norm). Rows whose best two scores are closer than twice that, with 4× room for float32's summation
    error, are scored again in float32: the labels are float32's, up to float order in a near-tie."""
    c = centroids.astype(np.float32)
    if xb is None or len(c) < 2:
        return np.argmax(x @ c.T, axis=1)
    ct = torch.from_numpy(c)
    high = ct.bfloat16()
    both = (xb @ torch.cat([high, (ct - high.float()).bfloat16()]).T).float()
    top2 = (both[:, : len(c)] + both[:, len(c):]).topk(2, dim=1)
    labels = top2.indices[:, 0].numpy().copy()
    best, second = top2.values.numpy().T
    bound = 2.0 ** -7 * np.maximum(np.abs(best), np.abs(second)) + 2.0 ** -12 / inv_norm
    close = np.flatnonzero(best - second <= bound)
    labels[close] = np.argmax(_torch_matmul(x[close], c.T), axis=1)
    return labels


def _sums(x: np.ndarray, inv_norm: np.ndarray, labels: np.ndarray, k: int,
          leaving: np.ndarray | None = None, mm: Matmul = np.matmul) -> np.ndarray:
    """[k, d] float64: the sum of each cluster's unit rows; with `leaving`, the change in the sums when each row
    moves from cluster leaving[i] to labels[i]."""
    weights = np.zeros((k, len(x)), dtype=np.float32)
    idx = np.arange(len(x))
    weights[labels, idx] = inv_norm  # each member's unit row; far faster than np.add.at
    if leaving is not None:
        weights[leaving, idx] = -inv_norm
    return mm(weights, x).astype(np.float64)


def _unit_sums(sums: np.ndarray, counts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Unit centroids from cluster sums; an emptied cluster stays where it was (balancing refills it)."""
    out = sums.copy()
    out[counts == 0] = fallback[counts == 0]
    return _normalise(out)


def balanced_assign(similarity: np.ndarray, sizes: list[int], eps_final: float = 1e-7) -> np.ndarray:
    """Maximise total similarity subject to cluster e receiving exactly sizes[e] points.

    An ε-scaling auction (Bertsekas) over k cluster prices: the slots of one cluster are identical, so this
    solves the n×n assignment that linear_sum_assignment would, to within n·eps_final of the optimum, in
    O(rounds·n·k) rather than O(n³) — about 10× faster at n=1536, k=8, and it scales to wide FFNs. Each ε phase
    bids all unassigned points at once while there are many (_bid_together), then one at a time (_bid_one_by_one)."""
    n, k = similarity.shape
    if sum(sizes) != n:  # fewer slots than points: the auction never ends; more: a cluster comes back short
        raise ValueError("cluster sizes must sum to the number of points")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    capacity = np.asarray(sizes)
    price = np.zeros(k)
    eps = 0.1 * max(float(np.ptp(similarity)), 1e-12)
    while True:
        owner = np.full(n, -1, dtype=np.int64)
        held_bid = np.zeros(n)
        unassigned = _bid_together(similarity, capacity, price, owner, held_bid, eps)
        _bid_one_by_one(similarity, capacity, price, owner, held_bid, eps, unassigned)
        if eps <= eps_final:
            return owner
        eps = max(eps / 10, eps_final)


# A round of _bid_together costs about 0.1 ms per cluster that gets bids, however few bid; a bid of
# _bid_one_by_one about 7 µs. On SmolLM2's statistics most of an auction's rounds were the tail of a phase, a chain
# of a few displaced points outbidding one another, so below this many bidders they go one at a time (2.5× faster
# over carve's calls, the same optimum; 256 was the fastest of 16-1024).
_ONE_BY_ONE = 256


def _bid_together(similarity: np.ndarray, capacity: np.ndarray, price: np.ndarray, owner: np.ndarray,
                  held_bid: np.ndarray, eps: float) -> np.ndarray:
    """Jacobi rounds of one ε phase, every unassigned point bidding at once, while more than _ONE_BY_ONE are;
    updates price, owner and held_bid in place and returns the points still unassigned."""
    unassigned = np.flatnonzero(owner < 0)
    while len(unassigned) > _ONE_BY_ONE:
        value = similarity[unassigned] - price
        top2 = np.argpartition(-value, 1, axis=1)[:, :2]
        v2 = np.take_along_axis(value, top2, axis=1)
        first = v2[:, 0] >= v2[:, 1]
        best = np.where(first, top2[:, 0], top2[:, 1])
        bid = price[best] + np.abs(v2[:, 0] - v2[:, 1]) + eps
        for e in np.unique(best):
            new = unassigned[best == e]
            holders = np.flatnonzero(owner == e)
            cand = np.concatenate([holders, new])
            cand_bid = np.concatenate([held_bid[holders], bid[best == e]])
            if len(cand) > capacity[e]:  # keep the highest bids; the rest are outbid and bid again
                keep = np.argpartition(-cand_bid, capacity[e] - 1)[: capacity[e]]
                owner[cand] = -1
                cand, cand_bid = cand[keep], cand_bid[keep]
                price[e] = cand_bid.min()
            owner[cand] = e
            held_bid[cand] = cand_bid
        unassigned = np.flatnonzero(owner < 0)
    return unassigned


def _bid_one_by_one(similarity: np.ndarray, capacity: np.ndarray, price: np.ndarray, owner: np.ndarray,
                    held_bid: np.ndarray, eps: float, unassigned: np.ndarray) -> None:
    """Gauss-Seidel bids until every point is assigned, each cluster's holders in a min-heap of their bids, so an
    outbid holder is found without a scan; a full cluster's price is its lowest held bid."""
    heaps: list[list[tuple[float, int]]] = [[] for _ in range(len(capacity))]
    for i in np.flatnonzero(owner >= 0).tolist():
        heaps[owner[i]].append((held_bid[i], i))
    for heap in heaps:
        heapq.heapify(heap)
    queue = unassigned.tolist()
    while queue:
        i = queue.pop()
        value = similarity[i] - price
        e = int(np.argmax(value))
        best = value[e]
        value[e] = -np.inf
        bid = float(price[e] + best - value.max() + eps)
        heap = heaps[e]
        heapq.heappush(heap, (bid, i))
        owner[i], held_bid[i] = e, bid
        if len(heap) > capacity[e]:
            _, outbid = heapq.heappop(heap)
            owner[outbid] = -1
            queue.append(outbid)
        if len(heap) == capacity[e]:
            price[e] = heap[0][0]
