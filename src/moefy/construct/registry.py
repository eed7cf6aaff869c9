"""The construction-method registry, and make_plan: the per-layer loop that turns weights (and calibration stats)
into a MoEPlan. A method returns a Split: routed neuron groups, optional always-on shared neurons."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from moefy.construct import methods
from moefy.construct.layer import LayerInput
from moefy.construct.placement import moe_layers
from moefy.construct.plan import EXPERT_SIZE_MULTIPLE, LayerPlan, MoEPlan, PlanMeta, pad_groups, pad_to
from moefy.construct.recipe import BuildRecipe
from moefy.construct.router_init import ROUTER_INITS, RouterContext
from moefy.construct.split import random_split, sequential_split
from moefy.errors import MoefyError
from moefy.families import Family
from moefy.host_memory import release_freed
from moefy.profile.stats import NeuronStats
from moefy.progress import progress
from moefy.tensor_io import LazyCheckpoint


@dataclass(frozen=True)
class Split:
    routed: list[np.ndarray]
    shared: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    overlap: bool = False  # experts may share neurons (then the partition exactness test does not apply)
    reinit: list[np.ndarray] | None = None  # per expert: positions in its group to re-initialise (drop-upcycling)
    domain_groups: list[list[int]] | None = None  # per expert: the calibration domains it was built from (dive)


Method = Callable[[LayerInput, BuildRecipe, np.random.Generator], Split]


def _down_norms(layer: LayerInput, recipe: BuildRecipe):
    """carve's cluster.measure = output: each neuron's down-projection column norm, read only when asked for."""
    return layer.weight("down").norm(dim=0) if recipe.cluster.measure == "output" else None


METHODS: dict[str, Method] = {
    "random": lambda layer, r, rng: Split(random_split(layer.width, r.experts, rng)),
    "sequential": lambda layer, r, rng: Split(sequential_split(layer.width, r.experts)),
    "cluster": lambda layer, r, rng: Split(methods.cluster_split(layer.stored(r.cluster.rows), r, rng)),
    "coactivation": lambda layer, r, rng: Split(methods.coactivation_split(layer.stats("coactivation"), r, rng)),
    "carve": lambda layer, r, rng: Split(*methods.carve_split(layer.stats("carve"), r, rng, _down_norms(layer, r))),
    "importance": lambda layer, r, rng: Split(*methods.importance_split(layer.stats("importance"), r)),
    "upcycle": lambda layer, r, rng: Split([np.arange(layer.width)] * r.experts, overlap=True,
                                           reinit=methods.drop_upcycle_slots(layer.width, r, rng)),
    "dive": lambda layer, r, rng: Split(methods.dive_experts(layer.stats("dive"), layer.weight("down"),
                                                             layer.extra["groups"], r),
                                        overlap=True, domain_groups=layer.extra["groups"]),
}
# Methods that split the FFN into any number of equal experts, so --experts, --top-k and --shared-fraction resize
# them freely: upcycle copies the FFN, dive prunes it per domain group, importance makes one expert per domain.
RESIZABLE = ("random", "sequential", "cluster", "coactivation", "carve")
# Methods whose natural output scale is not N/k: copies of the full FFN, and DIVE's pruned FFNs, each stand for
# the whole dense FFN already.
DEFAULT_SCALE = {"upcycle": 1.0, "dive": 1.0}
# carve's defaults are the best training-free setting we measured on SmolLM2 (docs/results.md): a shared block of
# 1/8 of the FFN and routers fitted on calibration activations. dive's router rows are its groups' hidden centroids.
METHOD_DEFAULTS: dict[str, dict] = {"carve": {"shared_fraction": 0.125, "router_kind": "fit"},
                                    "dive": {"router_kind": "domain"}}


def keeps_shared_neurons(recipe: BuildRecipe) -> bool:
    """Only these splits make an always-on shared block; any other would silently ignore shared_fraction."""
    return recipe.method == "carve" or (recipe.method == "importance" and recipe.importance == "inter")


def resolve_defaults(recipe: BuildRecipe) -> BuildRecipe:
    """Fill the per-method defaults into the recipe, so the saved recipe says what actually ran."""
    if recipe.shared_fraction and not keeps_shared_neurons(recipe):
        raise MoefyError(f"--shared-fraction applies to carve and importance (inter) only; method {recipe.method!r} "
                         "makes no shared block and would ignore it")
    defaults = METHOD_DEFAULTS.get(recipe.method, {})
    update = {}
    if recipe.shared_fraction is None:
        update["shared_fraction"] = defaults.get("shared_fraction", 0.0)
    if recipe.router.kind is None:
        update["router"] = recipe.router.model_copy(update={"kind": defaults.get("router_kind", "random")})
    if recipe.keep is None and recipe.method == "dive":
        update["keep"] = 1 / recipe.experts
    return recipe.model_copy(update=update)


def _reinit_mask(split: Split, size: int) -> np.ndarray | None:
    if split.reinit is None:
        return None
    mask = np.zeros((len(split.routed), size), dtype=bool)
    for e, positions in enumerate(split.reinit):
        # pad_groups sorts each group, so map group positions to the sorted slots
        order = np.argsort(split.routed[e], kind="stable")
        mask[e, np.searchsorted(split.routed[e][order], split.routed[e][positions])] = True
    return mask


def layer_rng(seed: int, layer: int, stream: str) -> np.random.Generator:
    """Independent, reproducible randomness per (seed, layer, purpose)."""
    return np.random.default_rng([seed, layer, sum(map(ord, stream))])


def make_plan(recipe: BuildRecipe, family: Family, config: dict, reader: LazyCheckpoint,
              stats: Callable[[], NeuronStats] | None = None, extra: dict | None = None) -> MoEPlan:
    width, hidden, n_layers = int(config["intermediate_size"]), int(config["hidden_size"]), int(config["num_hidden_layers"])
    if recipe.drop_fraction and recipe.method != "upcycle":
        raise MoefyError("drop_fraction (drop-upcycling) applies to method upcycle only")
    if recipe.experts > width:
        raise MoefyError(f"cannot make {recipe.experts} experts from an FFN of width {width}: "
                         "each expert needs at least one neuron")
    chosen = moe_layers(recipe.layers, n_layers)
    scale = recipe.scale if recipe.scale is not None else DEFAULT_SCALE.get(recipe.method, recipe.resolved_scale)
    splits, routers, scales = {}, {}, {}
    for i in progress(chosen, f"planning ({recipe.method}, router {recipe.router.kind})"):
        release_freed()  # the previous layer's weights and statistics (see host_memory)
        layer = LayerInput(i, width, hidden, lambda which, i=i: reader.get(family.ffn_key(i, which)), stats,
                           extra or {})
        split = METHODS[recipe.method](layer, recipe, layer_rng(recipe.seed, i, "method"))
        ctx = RouterContext(layer, recipe, split.routed, split.shared, scale, layer_rng(recipe.seed, i, "router"),
                            split.domain_groups)
        routers[i], scales[i] = ROUTER_INITS[recipe.router.kind](ctx)
        splits[i] = split
    largest = max(len(g) for s in splits.values() for g in s.routed)
    size = -(-largest // EXPERT_SIZE_MULTIPLE) * EXPERT_SIZE_MULTIPLE
    shared_size = max(len(s.shared) for s in splits.values())
    layers = {i: LayerPlan(pad_groups(s.routed, size), routers[i], scales[i], pad_to(s.shared, shared_size),
                           _reinit_mask(s, size)) for i, s in splits.items()}
    overlap = any(s.overlap for s in splits.values())
    meta = PlanMeta(source=recipe.model, family=family.model_type, method=recipe.method, num_layers=n_layers,
                    num_experts=recipe.experts, top_k=recipe.top_k, ffn_width=width, hidden_size=hidden,
                    expert_size=size, moe_layers=chosen, scales=[scales[i] for i in chosen], shared_size=shared_size,
                    coverage="overlap" if overlap else "partition", seed=recipe.seed,
                    domain_groups=(extra or {}).get("group_names"))
    plan = MoEPlan(meta, layers)
    plan.validate()
    return plan
