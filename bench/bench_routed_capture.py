"""How much of a token's routed activation mass its routed experts hold (issue: near-lossless conversion): per carve
split of SmolLM2-135M, each calibration token's |a| × down-column norm over the neurons outside the shared block,
and the share of it inside the k experts that (a) a random choice, (b) a linear router, (c) an oracle picks.

(b) is a ridge fit from the MLP input to each token's standardised expert mass (refit.fit_router_logits, the
reconstruction's router fit, given the target of carve's refinement), fitted on half of the profiler's sampled
tokens and scored on the other half; (c) takes the k experts with the most mass. `+ overlap` adds N/2 experts of
the same size that may repeat neurons: the profile's tokens clustered by their routed pattern (balanced k-means),
each cluster's expert holding the neurons its tokens use most. A token's share counts a neuron once, however many
of its chosen experts hold it; the oracle and the router's target still rank experts by their summed mass, which
counts a repeated neuron twice, so with overlap the oracle is not the best union.

Usage: python bench/bench_routed_capture.py   (run it alone; writes docs/results.md section 'routed-capture')"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from moefy.construct.cluster import balanced_kmeans
from moefy.construct.methods import balanced_sizes
from moefy.construct.refit import fit_router_logits

sys.path.insert(0, str(Path(__file__).parent))
from common import carve_layers  # noqa: E402
from docs_sections import replace_section  # noqa: E402

# (label, experts, top_k, shared_fraction): carve's default, make demo's split, and the 50% splits of docs/results.md
SPLITS = [("25%: shared 1/8 + 8 of 56 × 24 (carve's default)", 56, 8, 0.125),
          ("25%: shared 1/8 + 4 of 28 × 48 (make demo's split)", 28, 4, 0.125),
          ("50%: shared 3/8 + 8 of 40 × 24", 40, 8, 0.375),
          ("50%: shared 3/8 + 4 of 20 × 48", 20, 4, 0.375)]
RIDGE = 1e-2


def _share(m: np.ndarray, member: np.ndarray, chosen: np.ndarray) -> float:
    """Σ over tokens of the mass in the union of each token's chosen experts, ÷ all routed mass."""
    held = member[:, chosen].any(axis=2).T  # [tokens, neurons]
    return float((m * held).sum() / m.sum())


def _shares(m: np.ndarray, x: np.ndarray, member: np.ndarray, k: int, fit: np.ndarray, test: np.ndarray):
    """(linear router, oracle) shares on the test tokens; member [neurons, experts] 0/1."""
    mass = m @ member
    router = fit_router_logits(torch.from_numpy(x[fit]).double(), torch.from_numpy(mass[fit]), RIDGE).double().numpy()
    linear = np.argsort(-(x[test] @ router.T), axis=1)[:, :k]
    oracle = np.argsort(-mass[test], axis=1)[:, :k]
    return _share(m[test], member, linear), _share(m[test], member, oracle)


def _overlap_experts(m: np.ndarray, count: int, size: int) -> np.ndarray:
    """[neurons, count] 0/1: the tokens clustered by routed pattern, each cluster's `size` most used neurons."""
    pattern = m / np.maximum(m.sum(1, keepdims=True), 1e-12)
    labels = balanced_kmeans(pattern, balanced_sizes(len(m), count), np.random.default_rng(0), 10, 1)
    member = np.zeros((m.shape[1], count))
    for c in range(count):
        member[np.argsort(-pattern[labels == c].mean(0))[:size], c] = 1
    return member


def main() -> None:
    rows = []
    for label, experts, top_k, shared in SPLITS:
        shares = []
        for i, layer, split, _ in carve_layers(dict(experts=experts, top_k=top_k, shared_fraction=shared)):
            st = layer.stats("carve")
            routed = np.sort(np.concatenate(split.routed))
            m = (st["abs_act"] * layer.weight("down").norm(dim=0)).numpy()[:, routed]
            x = st["hidden"].numpy()
            order = np.random.default_rng(1).permutation(len(m))
            fit, test = np.sort(order[: len(m) // 2]), np.sort(order[len(m) // 2:])
            member = np.stack([np.isin(routed, g) for g in split.routed], axis=1).astype(float)
            extra = _overlap_experts(m[fit], experts // 2, len(split.routed[0]))
            shares.append((*_shares(m, x, member, top_k, fit, test),
                           *_shares(m, x, np.concatenate([member, extra], axis=1), top_k, fit, test)))
            print(f"{label} layer {i}: " + " ".join(f"{s:.3f}" for s in shares[-1]), flush=True)
        rows.append((label, top_k / experts, np.mean(shares, axis=0)))
    lines = [
        "## How much of a token's routed mass its routed experts hold (SmolLM2-135M, demo calibration)",
        "",
        "`python bench/bench_routed_capture.py`: per carve split (today's defaults, seed 0), each sampled "
        "calibration token's |a| × down-column norm over the neurons outside the shared block; cells are the share "
        "of it inside the chosen experts, the mean over the 30 layers, on half of the profiler's 2,048 sampled "
        "tokens (the linear router is fitted on the other half). Random = k ÷ N, the expectation of a random "
        "choice. '+ overlap': N/2 more experts whose neurons may repeat (see the script's docstring).",
        "",
        "| split | random | linear router | oracle | + overlap: linear router | + overlap: oracle |",
        "|---|---|---|---|---|---|",
        *[f"| {label} | {rand:.1%} | {s[0]:.1%} | {s[1]:.1%} | {s[2]:.1%} | {s[3]:.1%} |"
          for label, rand, s in rows],
    ]
    replace_section(Path(__file__).parent.parent / "docs" / "results.md", "routed-capture", "\n".join(lines))


if __name__ == "__main__":
    main()
