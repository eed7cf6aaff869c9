"""carve's partition step for one FFN layer (construct/methods.py `carve_split`: the shared block, balanced k-means,
then the refinement for its routers) at a model's shapes, on synthetic statistics: seconds per layer with the
refinement off (`refine_rounds` 0) and at the default, and the refinement's share. The statistics have the
profiler's shapes (|a| and MLP inputs of ProfileOptions' 2,048 sampled tokens) and random values, so the timing is
right and the partition meaningless; bench_profile.py times the step on SmolLM2's real statistics.

    python bench/bench_carve_split.py                     # SmolLM2, TinyLlama-1B and LLaMA-2-7B shapes
    python bench/bench_carve_split.py --shapes 7b --repeats 3

The split is carve's defaults (56 experts, top-8, a shared eighth of the FFN); one process, single runs in turn."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moefy.construct.methods import carve_split
from moefy.construct.recipe import BuildRecipe
from moefy.construct.registry import resolve_defaults
from moefy.profile.options import ProfileOptions

SHAPES = {"smollm2": (576, 1536), "1b": (2048, 5632), "7b": (4096, 11008)}  # hidden, FFN width


def stats(hidden: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = ProfileOptions().sample_tokens
    # Heavy-tailed |a|, as SwiGLU activations are: most neurons near zero on a token, a few large.
    abs_act = torch.randn(tokens, width, generator=g).abs() ** 3
    return {"top_freq": torch.rand(4, width, generator=g), "domain_tokens": torch.full((4,), 4096.0),
            "abs_act": abs_act, "hidden": torch.randn(tokens, hidden, generator=g)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--repeats", type=int, default=2, help="layers timed per shape and setting (different seeds)")
    args = p.parse_args()
    default = resolve_defaults(BuildRecipe(model="-", method="carve", experts=56, top_k=8))
    settings = [("refine_rounds 0", 0), (f"refine_rounds {default.cluster.refine_rounds} (default)",
                                         default.cluster.refine_rounds)]
    print(f"carve_split per layer, {ProfileOptions().sample_tokens} sampled tokens, 56 experts top-8, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| shape (hidden, FFN) | " + " | ".join(f"{name}, s" for name, _ in settings)
          + " | refinement ÷ clustering |")
    print("|---|" + "---|" * len(settings) + "---|")
    for shape in args.shapes:
        hidden, width = SHAPES[shape]
        seconds = []
        for _, rounds in settings:
            recipe = default.model_copy(update={"cluster": default.cluster.model_copy(
                update={"refine_rounds": rounds})})
            times = []
            for seed in range(args.repeats):
                layer = stats(hidden, width, seed)
                t0 = time.perf_counter()
                carve_split(layer, recipe, np.random.default_rng(seed))
                times.append(time.perf_counter() - t0)
            seconds.append(sum(times) / len(times))
        print(f"| {shape} ({hidden}, {width}) | " + " | ".join(f"{s:.2f}" for s in seconds)
              + f" | {(seconds[1] - seconds[0]) / seconds[0]:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
