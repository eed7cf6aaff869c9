"""The construction-method registry, and make_plan: the per-layer loop that turns weights into a MoEPlan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from moefy.construct.cluster import balanced_kmeans
from moefy.construct.plan import LayerPlan, MoEPlan, PlanMeta, balanced_sizes, expert_size_for, pad_groups
from moefy.construct.router_init import ROUTER_INITS
from moefy.construct.split import random_split, sequential_split
from moefy.errors import MoefyError
from moefy.families import Family
from moefy.progress import progress
from moefy.recipes import BuildRecipe
from moefy.tensor_io import LazyCheckpoint


@dataclass(frozen=True)
class LayerInput:
    """What a method may look at for one layer. Weights are read lazily: split methods never touch them."""

    layer: int
    width: int
    read: Callable[[str], torch.Tensor]  # "gate" | "up" | "down" -> that layer's dense weight


Method = Callable[[LayerInput, BuildRecipe, np.random.Generator], list[np.ndarray]]


def _random(layer: LayerInput, recipe: BuildRecipe, rng: np.random.Generator) -> list[np.ndarray]:
    return random_split(layer.width, recipe.experts, rng)


def _sequential(layer: LayerInput, recipe: BuildRecipe, rng: np.random.Generator) -> list[np.ndarray]:
    return sequential_split(layer.width, recipe.experts)


def _cluster(layer: LayerInput, recipe: BuildRecipe, rng: np.random.Generator) -> list[np.ndarray]:
    rows = layer.read(recipe.cluster.rows).float().numpy()
    sizes = balanced_sizes(layer.width, recipe.experts)
    labels = balanced_kmeans(rows, sizes, rng, recipe.cluster.iterations, recipe.cluster.balanced_rounds)
    return [np.flatnonzero(labels == e) for e in range(recipe.experts)]


METHODS: dict[str, Method] = {"random": _random, "sequential": _sequential, "cluster": _cluster}


def layer_rng(seed: int, layer: int, stream: str) -> np.random.Generator:
    """Independent, reproducible randomness per (seed, layer, purpose)."""
    return np.random.default_rng([seed, layer, sum(map(ord, stream))])


def make_plan(recipe: BuildRecipe, family: Family, config: dict, reader: LazyCheckpoint) -> MoEPlan:
    if recipe.method not in METHODS:
        raise MoefyError(f"unknown method {recipe.method!r}; available: {', '.join(METHODS)}")
    width, hidden = int(config["intermediate_size"]), int(config["hidden_size"])
    if recipe.experts > width:
        raise MoefyError(f"cannot make {recipe.experts} experts from an FFN of width {width}: "
                         "each expert needs at least one neuron")
    method = METHODS[recipe.method]
    size = expert_size_for(width, recipe.experts)
    layers = {}
    for i in progress(range(int(config["num_hidden_layers"])), f"planning ({recipe.method})"):
        layer = LayerInput(i, width, lambda which, i=i: reader.get(family.ffn_key(i, which)))
        groups = method(layer, recipe, layer_rng(recipe.seed, i, "method"))
        router = ROUTER_INITS[recipe.router.kind](recipe.router, recipe.experts, hidden,
                                                  layer_rng(recipe.seed, i, "router"))
        layers[i] = LayerPlan(pad_groups(groups, size), router, recipe.resolved_scale)
    meta = PlanMeta(source=recipe.model, family=family.model_type, method=recipe.method,
                    num_layers=int(config["num_hidden_layers"]),
                    num_experts=recipe.experts, top_k=recipe.top_k, ffn_width=width, hidden_size=hidden,
                    expert_size=size, moe_layers=sorted(layers), scales=[recipe.resolved_scale] * len(layers),
                    seed=recipe.seed)
    plan = MoEPlan(meta, layers)
    plan.validate()
    return plan
