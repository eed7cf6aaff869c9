"""Weight-free splits (LLaMA-MoE): a seeded random permutation, or contiguous slices."""

from __future__ import annotations

import numpy as np

from moefy.construct.plan import balanced_sizes


def _slices(order: np.ndarray, parts: int) -> list[np.ndarray]:
    bounds = np.cumsum([0, *balanced_sizes(len(order), parts)])
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def random_split(width: int, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    return _slices(rng.permutation(width), parts)


def sequential_split(width: int, parts: int) -> list[np.ndarray]:
    return _slices(np.arange(width), parts)
