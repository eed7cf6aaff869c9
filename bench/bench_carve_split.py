"""carve's partition step for one FFN layer (construct/methods.py `carve_split`: the shared block, balanced k-means,
then the refinement for its routers) at a model's shapes, on synthetic statistics: seconds per layer with the
refinement off (`refine_rounds` 0) and at the default, the refinement's share, and the step's peak RSS above the
statistics it is given (each layer in a child process of its own). The statistics have the profiler's shapes (|a|
and MLP inputs of ProfileOptions' 2,048 sampled tokens) and random values, so the timing and memory are right and
the partition meaningless; bench_profile.py times the step on SmolLM2's real statistics.

    python bench/bench_carve_split.py                     # SmolLM2, TinyLlama-1B and LLaMA-2-7B shapes
    python bench/bench_carve_split.py --shapes 7b --repeats 3

The split is carve's defaults (56 experts, top-8, a shared eighth of the FFN); one child process per layer, in
turn."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moefy.construct.methods import carve_split
from moefy.construct.recipe import BuildRecipe
from moefy.construct.registry import resolve_defaults
from moefy.profile.options import ProfileOptions

sys.path.insert(0, str(Path(__file__).parent))
from bench_refine import SHAPES  # noqa: E402  (hidden, FFN width) of each model


def stats(hidden: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = ProfileOptions().sample_tokens
    # Heavy-tailed |a|, as SwiGLU activations are: most neurons near zero on a token, a few large.
    abs_act = torch.randn(tokens, width, generator=g).abs_().pow_(3)  # in place: no transient copies in the peak
    return {"top_freq": torch.rand(4, width, generator=g), "domain_tokens": torch.full((4,), 4096.0),
            "abs_act": abs_act, "hidden": torch.randn(tokens, hidden, generator=g),
            "down_norms": torch.rand(width, generator=g) + 0.5}


def child(shape: str, rounds: int, seed: int) -> dict:
    """One layer's carve_split: seconds, and peak RSS above the process once its statistics exist."""
    recipe = resolve_defaults(BuildRecipe(model="-", method="carve", experts=56, top_k=8))
    recipe = recipe.model_copy(update={"cluster": recipe.cluster.model_copy(update={"refine_rounds": rounds})})
    layer = stats(*SHAPES[shape], seed)
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    # the default cluster.measure (output) scales |a| by the down-projection column norms, as the registry passes them
    norms = layer.pop("down_norms") if recipe.cluster.measure == "output" else None
    carve_split(layer, recipe, np.random.default_rng(seed), norms)
    return {"seconds": time.perf_counter() - t0,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - floor}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--repeats", type=int, default=2, help="layers timed per shape and setting (different seeds)")
    p.add_argument("--child", nargs=3, metavar=("SHAPE", "ROUNDS", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    default_rounds = resolve_defaults(BuildRecipe(model="-", method="carve")).cluster.refine_rounds
    settings = [("refine_rounds 0", 0), (f"refine_rounds {default_rounds} (default)", default_rounds)]
    print(f"carve_split per layer, {ProfileOptions().sample_tokens} sampled tokens, 56 experts top-8, "
          f"torch threads {torch.get_num_threads()}, mean of {args.repeats} layers\n")
    print("| shape (hidden, FFN) | " + " | ".join(f"{name}: s, peak MiB" for name, _ in settings)
          + " | refinement ÷ clustering |")
    print("|---|" + "---|" * len(settings) + "---|")
    for shape in args.shapes:
        cells = []
        for _, rounds in settings:
            runs = [json.loads(subprocess.run([sys.executable, __file__, "--child", shape, str(rounds), str(seed)],
                                              check=True, capture_output=True, text=True).stdout)
                    for seed in range(args.repeats)]
            cells.append((sum(r["seconds"] for r in runs) / len(runs), max(r["peak"] for r in runs) / 2**20))
        hidden, width = SHAPES[shape]
        print(f"| {shape} ({hidden}, {width}) | " + " | ".join(f"{s:.2f}, {m:.0f}" for s, m in cells)
              + f" | {(cells[1][0] - cells[0][0]) / cells[0][0]:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
