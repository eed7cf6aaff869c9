"""Where a build's loss sits: bounds computed inside the dense model, beside the MoE as built.

- Expert oracle: the build's own partition, each token routed to the k experts that help most, knowing their true
  outputs. For a partition, the k experts with the largest share of the full routed output along its direction
  (weight 1 each, so the chosen experts add up as their part of the dense FFN); for overlapping experts (dive,
  upcycle), where each expert stands for the whole FFN, the k closest to the dense FFN's output, averaged.
- Neuron oracle: each token keeps its own top fraction of FFN neurons by |a_j|, at the build's active fraction.

The gap between the built MoE and the expert oracle is lost to routing; between the expert oracle and dense, to the
partition and the expert weights; the neuron oracle bounds what any partition at this budget could keep."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from moefy.construct.plan import PAD, MoEPlan


def active_fraction(plan: MoEPlan) -> float:
    """FFN neurons computed per token (shared + k experts' real neurons), as a fraction of the dense FFN."""
    m, lp = plan.meta, next(iter(plan.layers.values()))
    per_expert = float((lp.experts != PAD).sum(1).mean())
    return min(1.0, (int((lp.shared != PAD).sum()) + m.top_k * per_expert) / m.ffn_width)


@contextmanager
def neuron_oracle(model, fraction: float) -> Iterator[None]:
    """Inside the block, every layer's FFN keeps only each token's top `fraction` of neurons by |a_j|."""

    def keep_top(module, args):
        a = args[0]
        k = max(1, round(fraction * a.shape[-1]))
        return (a * torch.zeros_like(a, dtype=torch.bool).scatter_(-1, a.abs().topk(k, dim=-1).indices, True),)

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(keep_top) for layer in model.model.layers]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def expert_oracle(model, plan: MoEPlan) -> Iterator[None]:
    """Inside the block, each MoE layer of the dense model computes the plan's experts routed by the oracle."""
    k, overlap = plan.meta.top_k, plan.meta.coverage == "overlap"

    def oracle_ffn(lp):
        experts = torch.from_numpy(lp.experts)
        shared = torch.from_numpy(lp.shared[lp.shared != PAD])

        def hook(module, args, out):
            a = module.act_fn(module.gate_proj(args[0])) * module.up_proj(args[0])  # [B, T, I]
            down = module.down_proj.weight
            parts = torch.stack([a[..., e[e != PAD]] @ down[:, e[e != PAD]].T for e in experts], dim=-2)  # [B,T,N,H]
            base = a[..., shared] @ down[:, shared].T
            if overlap:
                score = -((parts - out.unsqueeze(-2)) ** 2).sum(-1)
            else:
                full = parts.sum(-2, keepdim=True)
                score = (parts * full).sum(-1) / full.norm(dim=-1).clamp_min(1e-12)
            chosen = torch.zeros_like(score).scatter_(-1, score.topk(k, dim=-1).indices, 1.0 / k if overlap else 1.0)
            return base + (parts * chosen.unsqueeze(-1)).sum(-2)
        return hook

    hooks = [model.model.layers[i].mlp.register_forward_hook(oracle_ffn(lp)) for i, lp in plan.layers.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
