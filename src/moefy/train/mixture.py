"""Domain weights: static presets, and Sheared-LLaMA's dynamic update from per-domain held-out loss against
reference losses measured on the dense source (never hard-coded)."""

from __future__ import annotations

import math

from moefy.errors import MoefyError
from moefy.train.recipe import DOMAIN_WEIGHTS, Mixture


def initial_weights(mixture: Mixture, domains: list[str]) -> dict[str, float]:
    if mixture.preset == "uniform":
        raw = {d: 1.0 for d in domains}
    else:
        raw = mixture.weights if mixture.preset == "custom" else DOMAIN_WEIGHTS[mixture.preset]
        missing = sorted(set(domains) - set(raw))
        if missing:
            raise MoefyError(f"mixture {mixture.preset!r} has no weight for domain(s) {', '.join(missing)}; "
                             f"it names {', '.join(sorted(raw))}")
        raw = {d: float(raw[d]) for d in domains}
    total = sum(raw.values())
    if total <= 0 or min(raw.values()) < 0:
        raise MoefyError("mixture weights must be non-negative and not all zero")
    return {d: w / total for d, w in raw.items()}


def sheared_llama_update(weights: dict[str, float], current: dict[str, float], reference: dict[str, float],
                         eta: float, smoothing: float) -> dict[str, float]:
    """w ← softmax(log w + η·(L_cur − L_ref)), then w ← (1 − c)·w + c/K: domains furthest above their reference loss
    gain weight."""
    logits = {d: math.log(max(w, 1e-12)) + eta * (current[d] - reference[d]) for d, w in weights.items()}
    top = max(logits.values())
    exp = {d: math.exp(v - top) for d, v in logits.items()}
    total = sum(exp.values())
    k = len(weights)
    return {d: (1 - smoothing) * e / total + smoothing / k for d, e in exp.items()}
