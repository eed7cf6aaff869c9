"""Variants of carve's refinement that are not in the library, measured against it (docs/results.md, the reading
under "reconstruction-refine-free"). Each variant runs bench_reconstruct.py's table with one row, with the variant
patched in for this process only, and prints the table instead of writing docs/results.md:

    python bench/bench_refine_variants.py rounds3        # 3 refinement rounds instead of 5, no reconstruction
    python bench/bench_refine_variants.py rounds10       # 10 rounds
    python bench/bench_refine_variants.py balanced       # each round's linear routing load-balanced by biases
    python bench/bench_refine_variants.py weighted       # each neuron's |a| weighted by its down-column norm
    python bench/bench_refine_variants.py weighted-demo  # the same, make demo's split + reconstruction, seed 0

The first four compare with `bench_reconstruct.py --refine-free`'s refined row, the last with `--refine`'s seed-0
row. Run alone: each takes 6-9 minutes on the 2-core CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from moefy.construct import methods, registry

sys.path.insert(0, str(Path(__file__).parent))
import bench_reconstruct as B  # noqa: E402

# DeepSeek-V3-style bias balancing: a sign step of this fraction of the scores' std, this many times.
BALANCE_STEP, BALANCE_STEPS = 0.02, 300


def balanced_routing(scores, mass: np.ndarray, top_k: int) -> np.ndarray:
    """methods.linear_routing with per-expert biases that even out each expert's share of the sampled tokens."""
    target = (mass - mass.mean(1, keepdims=True)) / np.maximum(mass.std(1, keepdims=True), 1e-6)
    fitted = scores(target)
    experts, bias = fitted.shape[1], np.zeros(fitted.shape[1])

    def chosen() -> np.ndarray:
        return np.argpartition(-(fitted + bias), top_k - 1, axis=1)[:, :top_k]
    for _ in range(BALANCE_STEPS):
        load = np.bincount(chosen().ravel(), minlength=experts) * experts / (len(fitted) * top_k)
        bias -= BALANCE_STEP * fitted.std() * np.sign(load - 1)
    routed = np.zeros_like(mass)
    np.put_along_axis(routed, chosen(), 1.0, axis=1)
    return routed


def weighted_carve(layer, recipe, rng) -> registry.Split:
    """carve with each neuron's |a| scaled by the norm of its down-projection column: its output's size."""
    stats = layer.stats("carve")
    norms = layer.weight("down").float().norm(dim=0)
    return registry.Split(*methods.carve_split({**stats, "abs_act": stats["abs_act"] * norms}, recipe, rng))


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) == 2 else ""
    free, demo = B.FREE[1], B.REFINE[0]  # the refined row without reconstruction; make demo's split, seed 0
    variants = {"rounds3": ("refine_free", free, " 3 rounds", {**free[2], "cluster": {"refine_rounds": 3}}),
                "rounds10": ("refine_free", free, " 10 rounds", {**free[2], "cluster": {"refine_rounds": 10}}),
                "balanced": ("refine_free", free, " each round's routing load-balanced", free[2]),
                "weighted": ("refine_free", free, " |a| weighted by down-column norm", free[2]),
                "weighted-demo": ("refine", demo, " |a| weighted by down-column norm", demo[2])}
    if variant not in variants:
        sys.exit(f"usage: bench_refine_variants.py {{{','.join(variants)}}}")
    table, (budget, label, _), suffix, fields = variants[variant]
    if variant == "balanced":
        methods.linear_routing = balanced_routing
    if variant.startswith("weighted"):
        registry.METHODS["carve"] = weighted_carve
    rows = B.TABLES[table][0]
    rows[:] = [(budget, label + "," + suffix, fields)]
    B.replace_section = lambda page, name, text: print(text)
    sys.argv = ["bench_reconstruct.py", "--" + table.replace("_", "-")]
    B.main()


if __name__ == "__main__":
    main()
