"""Variants of carve's refinement measured against it (docs/results.md, the reading under
"reconstruction-refine-free"). Each variant runs one of bench_reconstruct.py's tables with the variant applied, for
this process only where it is not a recipe option, and prints the table instead of writing docs/results.md:

    python bench/bench_refine_variants.py rounds3          # 3 refinement rounds instead of 5, no reconstruction
    python bench/bench_refine_variants.py rounds10         # 10 rounds
    python bench/bench_refine_variants.py balanced         # each round's linear routing load-balanced by biases
    python bench/bench_refine_variants.py weighted         # cluster.measure = output: |a| × down-column norm
    python bench/bench_refine_variants.py weighted-refine  # the same, the whole --refine table (3 seeds + 50%)
    python bench/bench_refine_variants.py weighted-shared  # weighted, and the shared block chosen by it too

weighted-refine compares with `bench_reconstruct.py --refine`, the others with `--refine-free`'s refined row;
those tables pin cluster.measure = activation, the default before the weighted rows made output carve's default.
Run alone: weighted-refine takes about 45 minutes on the 2-core CPU, each of the others 6-9."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from moefy.construct import methods

carve_split = methods.carve_split  # the library's, before a variant patches it

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


def weighted_shared_split(stats: dict, recipe, rng: np.random.Generator, down_norms=None):
    """carve_split with the shared block chosen by how often a neuron is among a sampled token's top fraction by
    |a| × down-column norm (per domain, over the profile's sampled tokens), not by the profile's top_freq of |a|."""
    top = methods._markers(stats["abs_act"] * down_norms, recipe.profile.top_fraction).float()
    freq = torch.stack([top[stats["sample_domain"] == d].mean(0) for d in range(len(stats["domain_tokens"]))])
    return carve_split({**stats, "top_freq": freq}, recipe, rng, down_norms)


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) == 2 else ""
    free = B.FREE[1]  # the refined row without reconstruction
    output = {"cluster": {"measure": "output"}}
    variants = {"rounds3": ("refine_free", " 3 rounds", {"cluster": {"refine_rounds": 3}}),
                "rounds10": ("refine_free", " 10 rounds", {"cluster": {"refine_rounds": 10}}),
                "balanced": ("refine_free", " each round's routing load-balanced", {}),
                "weighted": ("refine_free", " |a| weighted by down-column norm", output),
                "weighted-refine": ("refine", " |a| weighted by down-column norm", output),
                "weighted-shared": ("refine_free", " output measure, shared block by weighted top frequency", output)}
    if variant not in variants:
        sys.exit(f"usage: bench_refine_variants.py {{{','.join(variants)}}}")
    table, suffix, change = variants[variant]
    if variant == "balanced":
        methods.linear_routing = balanced_routing
    if variant == "weighted-shared":
        methods.carve_split = weighted_shared_split  # the registry looks it up at each call
    rows = B.TABLES[table][0]
    # in place: bench_reconstruct recognises its tables by identity and equality
    rows[:] = [(budget, label + "," + suffix, {**fields, **change})
               for budget, label, fields in ([free] if table == "refine_free" else rows)]
    B.replace_section = lambda page, name, text: print(text)
    sys.argv = ["bench_reconstruct.py", "--" + table.replace("_", "-")]
    B.main()


if __name__ == "__main__":
    main()
