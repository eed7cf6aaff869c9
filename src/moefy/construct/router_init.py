"""Router initialisations. Each returns (router [N, H], output scale for the layer).

Data-driven rows (hidden-kmeans, domain) describe token groups, not experts: they are matched to the experts whose
neurons those tokens activate most (a min-cost matching), so router row e really points at expert e."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moefy.construct.cluster import balanced_kmeans
from moefy.construct.layer import LayerInput
from moefy.construct.plan import balanced_sizes
from moefy.construct.recipe import BuildRecipe
from moefy.construct.router_fit import fit_router
from moefy.errors import MoefyError


@dataclass(frozen=True)
class RouterContext:
    layer: LayerInput
    recipe: BuildRecipe
    groups: list[np.ndarray]
    shared: np.ndarray
    scale: float
    rng: np.random.Generator
    domain_groups: list[list[int]] | None = None  # per expert: the domains it was built from (dive)

    def stats(self) -> dict:
        return self.layer.stats(f"router init {self.recipe.router.kind!r}")

    def expert_activation(self) -> torch.Tensor:
        """[S, N]: mean |a| over each expert's neurons, for every sampled token."""
        act = self.stats()["abs_act"]
        return torch.stack([act[:, torch.from_numpy(g)].mean(1) for g in self.groups], dim=1)


RouterInit = Callable[[RouterContext], tuple[torch.Tensor, float]]


def _random(ctx: RouterContext):
    n, h = len(ctx.groups), ctx.layer.hidden
    return torch.from_numpy(ctx.rng.standard_normal((n, h)) * ctx.recipe.router.std).float(), ctx.scale


def _zero(ctx: RouterContext):
    return torch.zeros(len(ctx.groups), ctx.layer.hidden), ctx.scale


def _centroid(ctx: RouterContext):
    """MoEfication/CMoE: per expert, the mean hidden state of the 10% of tokens that activate its neurons most."""
    hidden, score = ctx.stats()["hidden"], ctx.expert_activation()
    k = max(1, len(hidden) // 10)
    rows = [hidden[score[:, e].topk(k).indices].mean(0) for e in range(score.shape[1])]
    return torch.stack(rows), ctx.scale


def _match_rows(rows: torch.Tensor, assign: torch.Tensor, ctx: RouterContext) -> torch.Tensor:
    """Order token-group rows so row e goes with the expert those tokens activate most."""
    act = ctx.expert_activation()
    affinity = torch.stack([act[assign == c].mean(0) for c in range(len(rows))]).numpy()  # [groups, experts]
    g, e = linear_sum_assignment(-np.nan_to_num(affinity))
    out = torch.empty_like(rows)
    out[torch.from_numpy(e)] = rows[torch.from_numpy(g)]
    return out


def _hidden_kmeans(ctx: RouterContext):
    """LLaMA-MoE v2: centroids of a balanced k-means over the MLP-input hidden states."""
    hidden = ctx.stats()["hidden"]
    n = len(ctx.groups)
    labels = torch.from_numpy(balanced_kmeans(hidden.numpy(), balanced_sizes(len(hidden), n), ctx.rng))
    rows = torch.stack([hidden[labels == c].mean(0) for c in range(n)])
    return _match_rows(rows, labels, ctx), ctx.scale


def _domain(ctx: RouterContext):
    """DIVE / mergekit 'hidden': the mean hidden state of each calibration domain. An expert built from a group of
    domains (dive) gets its group's centroid directly: no matching, the expert is that group's pruned FFN."""
    stats = ctx.stats()
    domains = stats["sample_domain"]
    if ctx.domain_groups is not None:
        in_group = [torch.isin(domains, torch.tensor(g)) for g in ctx.domain_groups]
        return torch.stack([stats["hidden"][m].float().mean(0) for m in in_group]), ctx.scale
    n_domains = int(domains.max()) + 1
    if n_domains != len(ctx.groups):
        raise MoefyError(f"router init 'domain' needs one expert per calibration domain: {n_domains} domains, "
                         f"{len(ctx.groups)} experts")
    rows = torch.stack([stats["hidden"][domains == d].mean(0) for d in range(n_domains)])
    return _match_rows(rows, domains, ctx), ctx.scale


def _representative(ctx: RouterContext):
    """CMoE's analytic router: each expert's most activated neuron stands for it, via its gate_proj row."""
    abs_mean = ctx.stats()["abs_mean"].mean(0)
    reps = [g[int(torch.argmax(abs_mean[torch.from_numpy(g)]))] for g in ctx.groups]
    return ctx.layer.weight("gate")[torch.tensor(reps)].clone(), ctx.scale


def _fit(ctx: RouterContext):
    return fit_router(ctx.stats()["hidden"], ctx.layer.weight("gate"), ctx.layer.weight("up"),
                      ctx.layer.weight("down"), ctx.groups, ctx.recipe.top_k, ctx.recipe.router.ridge)


ROUTER_INITS: dict[str, RouterInit] = {
    "random": _random, "zero": _zero, "centroid": _centroid, "hidden-kmeans": _hidden_kmeans, "domain": _domain,
    "representative": _representative, "fit": _fit,
}
