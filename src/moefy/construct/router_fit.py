"""Training-free router fitting on cached calibration activations (cf. MoEfication's router training and Deja Vu's
predictors): no backprop through the model, one small least-squares problem per layer.

1. On the sampled MLP inputs x, compute each expert's true output E_e(x), and how far it moves the routed output along
   the direction of the full routed output Σ_e E_e(x) (in an ad-hoc comparison on SmolLM2 with 32k
   calibration tokens, this target gave carve at 25% active lower held-out perplexity than the plain norm ‖E_e(x)‖).
2. Ridge-regress router logits onto those per-token standardised contributions, so the top-k logits pick the
   experts that contribute most.
3. The stock gate weights the chosen experts by a softmax over their logits; pick a logit temperature and the output
   scale (closed form) that best reconstruct the full routed output Σ_e E_e(x) in least squares."""

from __future__ import annotations

import numpy as np
import torch

TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0, 16.0, 1e3)


def _expert_outputs(x: torch.Tensor, gate, up, down, group: np.ndarray) -> torch.Tensor:
    idx = torch.from_numpy(group)
    return (torch.nn.functional.silu(x @ gate[idx].T) * (x @ up[idx].T)) @ down[:, idx].T


def fit_router(hidden: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               groups: list[np.ndarray], top_k: int, ridge: float) -> tuple[torch.Tensor, float]:
    x = hidden.float()
    outputs = [_expert_outputs(x, gate, up, down, g) for g in groups]  # N × [S, H]
    full = sum(outputs)
    unit = full / full.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # How much each expert moves the output along the full output's direction, per token.
    contrib = torch.stack([(o * unit).sum(1) for o in outputs], dim=1)  # [S, N]
    target = (contrib - contrib.mean(1, keepdim=True)) / contrib.std(1, keepdim=True).clamp_min(1e-6)
    gram = x.T @ x
    penalty = ridge * gram.diagonal().mean() * torch.eye(x.shape[1])
    weight = torch.linalg.solve(gram + penalty, x.T @ target).T  # [N, H]
    logits = x @ weight.T
    chosen = logits.topk(top_k, dim=1).indices
    best = (float("inf"), 1.0, 1.0)
    for t in TEMPERATURES:
        w = torch.softmax(logits.gather(1, chosen) / t, dim=1)  # [S, k]
        mix = torch.zeros_like(full)
        for e, out in enumerate(outputs):
            mix += (w * (chosen == e)).sum(1, keepdim=True) * out
        scale = float((full * mix).sum() / (mix * mix).sum().clamp_min(1e-12))
        err = float(((full - scale * mix) ** 2).sum())
        if err < best[0]:
            best = (err, t, scale)
    _, t, scale = best
    return weight / t, scale
