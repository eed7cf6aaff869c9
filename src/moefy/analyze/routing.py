"""Routing statistics from router logits (pure functions). For each MoE layer and domain:
load (fraction of routed slots per expert), router entropy, top-1 confidence, load imbalance (coefficient of
variation of the load), the domain × domain L2 distance of load vectors (LLaMA-MoE Fig. 8) and specialisation
(each domain's L2 distance from the all-domain load)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerRouting:
    layer: int
    load: dict[str, list[float]]  # domain -> per-expert fraction of its routed slots
    entropy: dict[str, float]  # mean softmax entropy (nats) of the router over its tokens
    top1_confidence: dict[str, float]  # mean top-1 router probability
    imbalance_cv: dict[str, float]  # std / mean of the load vector
    specialisation: dict[str, float]  # L2 distance of the domain's load from the all-domain load
    distance: list[list[float]]  # domain × domain L2 distance of load vectors

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def layer_routing(layer: int, logits: dict[str, torch.Tensor], top_k: int) -> LayerRouting:
    """logits: domain -> [tokens, experts] router logits of one layer."""
    domains = list(logits)
    load, entropy, conf, cv = {}, {}, {}, {}
    all_counts = None
    for d in domains:
        probs = logits[d].float().softmax(-1)
        chosen = probs.topk(top_k, dim=-1).indices
        counts = torch.bincount(chosen.reshape(-1), minlength=probs.shape[1]).double()
        all_counts = counts if all_counts is None else all_counts + counts
        vec = counts / counts.sum()
        load[d] = vec.tolist()
        entropy[d] = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        conf[d] = float(probs.max(-1).values.mean())
        cv[d] = float(vec.std(unbiased=False) / vec.mean())
    overall = all_counts / all_counts.sum()
    vecs = torch.tensor([load[d] for d in domains], dtype=torch.float64)
    special = {d: float((vecs[i] - overall).norm()) for i, d in enumerate(domains)}
    distance = torch.cdist(vecs, vecs).tolist()
    return LayerRouting(layer, load, entropy, conf, cv, special, distance)
