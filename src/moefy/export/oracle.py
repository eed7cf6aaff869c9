"""Where a build's loss sits: bounds computed inside the dense model, beside the MoE as built.

- Expert oracle: the build's own partition, each token routed to the k experts that help most, knowing their true
  outputs. For a partition, the k experts with the largest share of the full routed output along its direction
  (weight 1 each, so the chosen experts add up as their part of the dense FFN); for overlapping experts (dive,
  upcycle), where each expert stands for the whole FFN, the k closest to the dense FFN's output, averaged.
- Neuron oracle: each token keeps its own top fraction of FFN neurons by |a_j|, at the build's active fraction.
- Routing oracle: the built MoE itself, its own (fitted) experts and router weights, with only the choice of experts
  made by an oracle that knows the dense model's residual stream: the k experts that bring each layer's output
  closest to it. Once reconstruction has refitted the experts, the expert oracle (dense weights) no longer bounds the
  build, and this one says how much of its loss a better choice of its own experts would win back.

The gap between the built MoE and the expert oracle is lost to routing; between the expert oracle and dense, to the
partition and the expert weights; the neuron oracle bounds what any partition at this budget could keep."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from moefy.construct.plan import PAD, MoEPlan


def active_neurons(plan: MoEPlan) -> float:
    """FFN neurons computed per token in an MoE layer: the shared block's and k experts' real neurons (more than the
    dense FFN where experts overlap, as upcycle's copies do)."""
    lp = next(iter(plan.layers.values()))
    return len(lp.shared_neurons) + plan.meta.top_k * float(lp.expert_sizes.mean())


def active_fraction(plan: MoEPlan) -> float:
    """active_neurons as a fraction of the dense FFN, at most 1 (the neuron oracle keeps at most every neuron)."""
    return min(1.0, active_neurons(plan) / plan.meta.ffn_width)


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
        shared = torch.from_numpy(lp.shared_neurons)

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


def greedy_routing(shared: torch.Tensor, outputs: torch.Tensor, probs: torch.Tensor, target: torch.Tensor, k: int,
                   renormalise: bool = True, chunk: int = 512) -> torch.Tensor:
    """[T, N] bool: each token's k experts, chosen one at a time, each the one that brings the layer's output
    (shared + the chosen experts' outputs weighted by the router's probabilities, renormalised over the chosen set as
    the stock Mixtral and Qwen2-MoE gates do) closest to `target`; then, per token, the router's own top-k where that
    is closer. Greedy, not an exhaustive search over subsets, so the set is a good one, not provably the best.

    shared, target [T, H]; outputs [T, N, H] (every expert's unweighted output); probs [T, N]. Tokens go in chunks
    so that the [chunk, N, H] candidates bound the memory."""
    top = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, probs.topk(k, dim=-1).indices, True)
    chosen = torch.zeros_like(top)
    for s in range(0, len(probs), chunk):
        p, e, y, base = probs[s:s + chunk], outputs[s:s + chunk], target[s:s + chunk], shared[s:s + chunk]
        rows = torch.arange(len(p), device=p.device)
        mine = chosen[s:s + chunk]
        acc, mass = torch.zeros_like(y), torch.zeros_like(p[:, :1])
        for _ in range(k):
            weight = p / (mass + p) if renormalise else p  # each candidate's weight once it joins the set
            keep = mass / (mass + p) if renormalise else torch.ones_like(p)  # and the share left to those chosen before
            cand = base.unsqueeze(1) + keep.unsqueeze(-1) * acc.unsqueeze(1) + weight.unsqueeze(-1) * e
            err = ((cand - y.unsqueeze(1)) ** 2).sum(-1).masked_fill(mine, float("inf"))
            c = err.argmin(-1)
            mine[rows, c] = True
            pc = p[rows, c].unsqueeze(-1)
            acc = (acc * mass + pc * e[rows, c]) / (mass + pc) if renormalise else acc + pc * e[rows, c]
            mass = mass + pc
        router = top[s:s + chunk]
        err_mine = ((_routed(base, e, p, mine, renormalise) - y) ** 2).sum(-1)
        err_router = ((_routed(base, e, p, router, renormalise) - y) ** 2).sum(-1)
        mine.copy_(torch.where((err_router <= err_mine).unsqueeze(-1), router, mine))
    return chosen


def _routed(shared: torch.Tensor, outputs: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
            renormalise: bool) -> torch.Tensor:
    w = probs * chosen
    if renormalise:
        w = w / w.sum(-1, keepdim=True)
    return shared + (w.unsqueeze(-1) * outputs).sum(-2)


def _expert_terms(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shared [T, H], every expert's output [T, N, H], router probabilities [T, N]) of a stock Mixtral or
    Qwen2-MoE sparse block (both hold `gate.weight` and fused `experts.gate_up_proj` / `experts.down_proj`; Qwen2-MoE
    adds a sigmoid-gated `shared_expert`)."""
    # floored at the smallest normal float: renormalising over a chosen set divides by their sum
    probs = F.linear(x, block.gate.weight).float().softmax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    gate, up = torch.einsum("th,nih->tni", x, block.experts.gate_up_proj).chunk(2, dim=-1)
    outputs = torch.einsum("tni,nhi->tnh", block.experts.act_fn(gate) * up, block.experts.down_proj)
    if hasattr(block, "shared_expert"):
        shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    else:
        shared = torch.zeros_like(x)
    return shared, outputs, probs


@contextmanager
def routing_oracle(moe, dense) -> Iterator[None]:
    """Inside the block, each sparse layer of the built `moe` routes each token by greedy_routing towards what
    would put its residual stream back on the dense model's after that layer (the target reconstruction fits): the
    dense stream after the layer, minus the MoE's own stream after attention. Each forward of `moe` runs `dense` on
    the same input ids first."""
    dense_after: dict[int, torch.Tensor] = {}
    mid: dict[int, torch.Tensor] = {}

    def run_dense(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        dense(input_ids=ids.to(dense.device))

    def keep_dense(i):
        def hook(module, args, out):
            dense_after[i] = out[0] if isinstance(out, tuple) else out
        return hook

    def keep_mid(i):
        def hook(module, args):
            mid[i] = args[0]
        return hook

    def route(i):
        def hook(block, args, out):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            shared, outputs, probs = _expert_terms(block, flat)
            target = (dense_after[i].to(x.device) - mid[i]).reshape(flat.shape)
            renormalise = getattr(block.gate, "norm_topk_prob", True)  # Mixtral's gate always renormalises
            k = block.gate.top_k
            chosen = greedy_routing(shared, outputs, probs, target, k, renormalise)
            return _routed(shared, outputs, probs, chosen, renormalise).to(out.dtype).reshape(out.shape)
        return hook

    hooks = [moe.register_forward_pre_hook(run_dense, with_kwargs=True)]
    for i, (layer, dense_layer) in enumerate(zip(moe.model.layers, dense.model.layers)):
        if hasattr(layer.mlp, "experts"):  # dense layers (Qwen2-MoE's mlp_only_layers) keep their FFN
            hooks += [dense_layer.register_forward_hook(keep_dense(i)),
                      layer.post_attention_layernorm.register_forward_pre_hook(keep_mid(i)),
                      layer.mlp.register_forward_hook(route(i))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
