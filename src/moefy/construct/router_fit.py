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
# Tokens whose N expert outputs are held at once, [chunk, N, H]: all S sampled tokens' outputs at once were the
# carve plan's peak (28 experts × 2,048 samples × 4,096 wide, fp32: 0.94 GB per 7B layer).
CHUNK = 512


def _experts(down: torch.Tensor, groups: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert: its neuron indices and its down projection's columns as [n, H], gathered once per layer. Gathering
    the strided columns again for every chunk made the chunked fit slower than the one-chunk fit it replaced (the
    carve plan's s / layer in docs/benchmarks.md); the copy is one down projection (180 MB per 7B layer in fp32)."""
    return [(idx, down[:, idx].T.contiguous()) for idx in map(torch.from_numpy, groups)]


def _activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[T, I]: every neuron's activation, in two wide matmuls; one narrow pair per expert (24 neurons each at carve's
    defaults) ran far below the BLAS's speed."""
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T)


def _outputs_from(act: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[T, N, H]: each expert's output E_e(x) from the tokens' activations (written in place: a list to stack would
    double it)."""
    out = torch.empty(len(act), len(experts), experts[0][1].shape[1])
    for e, (idx, down) in enumerate(experts):
        out[:, e] = act[:, idx] @ down
    return out


def _chosen_gram(act: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor]],
                 chosen: torch.Tensor) -> torch.Tensor:
    """[T, k, k] float64: the inner products <E_i, E_j> of each token's chosen experts only, which is all that scoring
    the stock gate's mix needs (the N × N products of every pair were a third of the fit)."""
    picked = torch.zeros(*chosen.shape, experts[0][1].shape[1])
    for e, (idx, down) in enumerate(experts):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        if len(token):
            picked[token, slot] = act[token[:, None], idx] @ down
    return torch.einsum("tkh,tlh->tkl", picked, picked).double()


def fit_router(hidden: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               groups: list[np.ndarray], top_k: int, ridge: float) -> tuple[torch.Tensor, float]:
    x = hidden.float()
    experts = _experts(down, groups)
    # The activations of every sampled token are kept ([S, I]: 90 MB at a 7B layer's 2,048 samples), so the second
    # pass over the chosen experts needs no gate/up matmul again.
    act = torch.cat([_activations(x[c:c + CHUNK], gate, up) for c in range(0, len(x), CHUNK)])
    # Per token, from one chunk of expert outputs at a time: how much each expert moves the output along the full
    # output's direction (the regression target), and <E_e, full>, which scores a weighted mix of experts against the
    # full output without holding any output.
    contrib, along = [], []
    for c in range(0, len(x), CHUNK):
        outputs = _outputs_from(act[c:c + CHUNK], experts)
        full = outputs.sum(1)  # [T, H]
        unit = full / full.norm(dim=1, keepdim=True).clamp_min(1e-12)
        contrib.append(torch.einsum("tnh,th->tn", outputs, unit))
        along.append(torch.einsum("tnh,th->tn", outputs, full).double())
    contrib, along = torch.cat(contrib), torch.cat(along)
    target = (contrib - contrib.mean(1, keepdim=True)) / contrib.std(1, keepdim=True).clamp_min(1e-6)
    gram = x.T @ x
    penalty = ridge * gram.diagonal().mean() * torch.eye(x.shape[1])
    weight = torch.linalg.solve(gram + penalty, x.T @ target).T  # [N, H]
    logits = x @ weight.T
    chosen = logits.topk(top_k, dim=1).indices
    overlap = torch.cat([_chosen_gram(act[c:c + CHUNK], experts, chosen[c:c + CHUNK])
                         for c in range(0, len(x), CHUNK)])  # [S, k, k]
    along_chosen = along.gather(1, chosen)
    best = (-float("inf"), 1.0, 1.0)
    for t in TEMPERATURES:
        mix = torch.softmax(logits.gather(1, chosen) / t, dim=1).double()  # the stock gate's weights, [S, k]
        cross = float((mix * along_chosen).sum())  # <full, mix>
        mix_sq = float(torch.einsum("sk,skl,sl->", mix, overlap, mix))  # ||mix||²
        scale = cross / max(mix_sq, 1e-12)
        # ||full||² − ||full − scale · mix||² at the best scale: the mix with the smallest error explains the most
        explained = scale * cross
        if explained > best[0]:
            best = (explained, t, scale)
    _, t, scale = best
    return weight / t, scale
