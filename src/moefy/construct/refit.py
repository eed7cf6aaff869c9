"""The math of layer-wise reconstruction, as pure functions on one layer's cached inputs (construct/reconstruct.py
runs them layer by layer).

Notation: x [T, H] the MLP inputs, y [T, H] what the MoE layer should output, a [T, I] the dense neuron activations
a_j = silu(g_j·x)·(u_j·x), N experts of S neuron slots (PAD slots are zero neurons), k active, and the stock gate:
softmax over all router logits, top-k, renormalised (= softmax over the k chosen logits).

With routing fixed, the MoE output is linear in every down projection at once:
    ŷ_t = Σ_e w_te · D_e a_t[experts_e] + D_s a_t[shared]
        = [w_t1 a_t[e_1], …, w_tN a_t[e_N], a_t[shared]] · [D_1 … D_N D_s]ᵀ
so all down projections (the N/k scale folded in) are one ridge regression on a [T, N·S + shared] design. The router
is fitted towards the experts whose own outputs point furthest along what the routed block must still produce."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch.nn.functional import grouped_mm

from moefy.construct.plan import PAD
from moefy.errors import MoefyError

# Temperatures tried for the router logits; each is judged by the layer error after the closed-form expert fit.
TEMPERATURES = (0.25, 0.5, 1.0, 2.0)


def activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T)


def gather_slots(a: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
    """a[:, slots] for a [*, S] or [N, S] slot table; PAD slots give zero columns (zero neurons)."""
    idx = torch.from_numpy(slots).reshape(-1).to(a.device)
    out = a[:, idx.clamp_min(0)]
    return out * (idx != PAD).to(a.dtype)


def top_k_gate(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock top-k gate as ([T, k] chosen experts, [T, k] their weights: the softmax of the k largest logits)."""
    top = logits.topk(top_k, dim=1)
    return top.indices, torch.softmax(top.values, dim=1)


def route(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, N] weights of the stock top-k gate, zero for the experts it does not choose."""
    chosen, weights = top_k_gate(logits, top_k)
    return torch.zeros_like(logits).scatter_(1, chosen, weights)


def design(a_experts: torch.Tensor, weights: torch.Tensor, a_shared: torch.Tensor) -> torch.Tensor:
    """[T, N·S + shared]: each expert's activations times its routing weight, then the always-on shared block."""
    t, n = weights.shape
    routed = (a_experts.view(t, n, -1) * weights[:, :, None]).reshape(t, -1)
    return torch.cat([routed, a_shared], dim=1)


class Normal:
    """Running ZᵀZ and ZᵀY over token chunks (float64), so the design never needs to exist for all tokens at once."""

    def __init__(self, cols: int, outputs: int, device: torch.device = torch.device("cpu")):
        self.gram = torch.zeros(cols, cols, dtype=torch.float64, device=device)
        self.cross = torch.zeros(cols, outputs, dtype=torch.float64, device=device)

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        self.gram += (z.T @ z).double()
        self.cross += (z.T @ y).double()

    def add_routed(self, z: torch.Tensor, y: torch.Tensor, chosen: torch.Tensor, experts: int, routed: int) -> None:
        """add(z, y) for a design whose first `routed` columns are N = `experts` blocks, zero outside each token's
        chosen experts (chosen [T, k]), and whose other columns (the shared block) are dense: only the blocks that
        can be nonzero are multiplied. Each expert's tokens give its block-row from its own block on (the experts
        chosen beside it, then the shared block), mirrored below the diagonal; the shared block's own block comes
        from every token. At 28 experts, top-4 and a shared eighth that is about a tenth of ZᵀZ's multiply-adds."""
        size = routed // experts
        pairs = chosen.reshape(-1)
        order = torch.argsort(pairs, stable=True)
        tokens = order // chosen.shape[1]  # each expert's tokens, expert by expert
        ends = torch.bincount(pairs, minlength=experts).cumsum(0).tolist()
        for e, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends)):
            if lo == hi:
                continue
            cols = slice(e * size, (e + 1) * size)
            rows = z[tokens[lo:hi], e * size:]  # its own block first
            part = (rows[:, :size].T @ rows).double()
            self.gram[cols, e * size:] += part
            self.gram[(e + 1) * size:, cols] += part[:, size:].T
            self.cross[cols] += (rows[:, :size].T @ y[tokens[lo:hi]]).double()
        shared = z[:, routed:]
        self.gram[routed:, routed:] += (shared.T @ shared).double()
        self.cross[routed:] += (shared.T @ y).double()

    def solve(self, ridge: float) -> torch.Tensor:
        """Ridge solution Wᵀ [cols, outputs]; the penalty is relative to the mean feature energy, and all-zero
        columns (PAD slots, experts no token chose) get exactly zero weights. Consumes the sums: the penalty is
        added and the Cholesky factor written in place of the Gram matrix (the same numbers as a factor beside it),
        so with every column live memory holds one Gram-sized matrix (a 7B layer's Gram is 11008² float64, ~1 GB)
        instead of four."""
        diag = self.gram.diagonal()
        live = diag > 0
        solution = torch.zeros_like(self.cross)
        if live.any():
            idx = live.nonzero().squeeze(1)
            g = self.gram if live.all() else self.gram[idx][:, idx]
            penalty = ridge * float(g.diagonal().mean())
            g.diagonal().add_(penalty)
            self.gram = None  # the caller's sums are spent: free them as soon as g is the only copy
            factor, info = torch.linalg.cholesky_ex(g, out=(g, torch.empty((), dtype=torch.int32, device=g.device)))
            if int(info):
                raise MoefyError(f"the reconstruction's normal equations are singular at ridge {ridge}: "
                                 "raise reconstruct.ridge (default 1e-3)")
            solution[idx] = torch.cholesky_solve(self.cross[idx], factor)
        return solution.float()


def chosen_only(device: torch.device) -> bool:
    """Whether the routed block computes each token's chosen experts only (grouped matmuls over tokens sorted by
    expert), or every expert times a routing weight that is zero for the others (three plain matmuls, N/k times the
    work). On a CUDA GPU, grouped_mm has fast kernels for bf16 only; in fp32 (the steps' and the closed form's
    precision) it loops over the experts and waits for the host on every call, and all experts measured faster
    (300 steps on an H100: 1B shape 0.83 s against 2.49, 7B in TF32 1.01 against 2.65; docs/benchmarks.md). On the
    CPU the chosen experts alone are faster (SmolLM2's layer: 0.5-0.6x the steps' time)."""
    return device.type != "cuda"


def _chosen_activations(x: torch.Tensor, chosen: torch.Tensor, experts: int, gate: torch.Tensor, up: torch.Tensor):
    """Activations [T·k, S] of every (token, chosen expert) pair, the pairs sorted by expert, from one grouped matmul
    per projection over the jagged groups; with the flat pairs (chosen.reshape(-1)), the sort order and the groups'
    end offsets. gate, up [N·S, H]; chosen [T, k]."""
    k, h = chosen.shape[1], x.shape[1]
    size = gate.shape[0] // experts
    pairs = chosen.reshape(-1)
    order = torch.argsort(pairs, stable=True)
    ends = torch.bincount(pairs, minlength=experts).cumsum(0).to(torch.int32)
    xs = x.index_select(0, order // k)
    a = (torch.nn.functional.silu(grouped_mm(xs, gate.reshape(experts, size, h).transpose(1, 2), offs=ends))
         * grouped_mm(xs, up.reshape(experts, size, h).transpose(1, 2), offs=ends))
    return a, pairs, order, ends


def chosen_experts_output(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: int,
                          gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """[T, H]: Σ_j w_tj · D_e a_t[experts_e] over each token's chosen experts e = chosen[t, j], computed for those
    experts only. The same sum as design(...) @ down.T, at k/N of its matmul cost.

    gate, up [N·S, H]; down [H, N·S]; live [N·S] zeroes PAD slots; chosen, weights [T, k]."""
    (t, k), h = chosen.shape, x.shape[1]
    size = len(live) // experts
    a, pairs, order, ends = _chosen_activations(x, chosen, experts, gate, up)
    a = a * live.reshape(experts, size)[pairs[order]] * weights.reshape(-1)[order, None]
    out = grouped_mm(a, down.reshape(h, experts, size).permute(1, 2, 0), offs=ends)
    # back to (token, j) order and summed over j, rather than index_add by token: CUDA's index_add adds colliding
    # rows in no fixed order, and the steps must give the same bits on every run
    return out.index_select(0, torch.argsort(order)).view(t, k, h).sum(1)


def all_experts_output(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: int,
                       gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """chosen_experts_output's sum (same arguments) in the design-matrix form: every expert for every token, times a
    routing weight that is zero for the experts not chosen. N/k times the matmul work, in three plain matmuls."""
    full = torch.zeros(len(x), experts, dtype=x.dtype, device=x.device).scatter(1, chosen, weights)
    a = torch.nn.functional.silu(x @ gate.T) * (x @ up.T) * live
    return design(a, full, a[:, :0]) @ down.T


def routed_output_form(device: torch.device):
    """The steps' routed block for a device (chosen_only)."""
    return chosen_experts_output if chosen_only(device) else all_experts_output


def chosen_experts_design(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: int,
                          gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[T, N·S]: the design's routed block, w_te · a_t[experts_e] for each token's chosen experts e and zero for the
    others, with the chosen experts' activations computed only (k/N of the matmul work of activations(x, gate, up)).
    gate, up [N·S, H] with PAD rows zero (their activations are then exactly 0); chosen, weights [T, k]."""
    t, k = chosen.shape
    a, pairs, order, _ = _chosen_activations(x, chosen, experts, gate, up)
    out = x.new_zeros(t, experts, gate.shape[0] // experts)
    out[order // k, pairs[order]] = a * weights.reshape(-1)[order, None]  # (token, expert) pairs are distinct
    return out.view(t, -1)


def all_experts_design(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: int,
                       gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """chosen_experts_design's block (same arguments) from every expert's activations times the routing weights."""
    full = torch.zeros(len(x), experts, dtype=x.dtype, device=x.device).scatter(1, chosen, weights)
    return design(activations(x, gate, up), full, x[:, :0])


def routed_design_form(device: torch.device):
    """The closed form's routed block for a device (chosen_only)."""
    return chosen_experts_design if chosen_only(device) else all_experts_design


def contributions(a_experts: torch.Tensor, down_experts: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """[T, N]: how far each expert's own output D_e a[e] points along the residual the routed block must produce
    (normalised per token), computed as Σ_j a_j (D_e[:, j]·r) with no [T, N, H] tensor."""
    t = a_experts.shape[0]
    n = down_experts.shape[0]
    flat = down_experts.permute(1, 0, 2).reshape(down_experts.shape[1], -1)  # [H, N·S]
    along = (a_experts * (residual @ flat)).view(t, n, -1).sum(-1)
    return along / residual.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_router_logits(x: torch.Tensor, scores: torch.Tensor, ridge: float) -> torch.Tensor:
    """Router [N, H] whose logits regress each token's standardised expert scores (ridge, closed form)."""
    target = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-6)
    gram = (x.T @ x).double()
    # the ridge goes onto the diagonal in place: an [H, H] identity and a sum beside the gram are two more 134 MB
    # float64 copies at a 7B layer's 4,096 inputs
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    return torch.linalg.solve(gram, (x.T @ target).double()).T.float()


def split_downs(solution: torch.Tensor, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked ridge solution as per-expert down projections [N, H, S] and the shared one [H, shared]."""
    routed, shared = solution[: n * size], solution[n * size:]
    return routed.T.reshape(-1, n, size).permute(1, 0, 2).contiguous(), shared.T.contiguous()


def nmse(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Normalised squared error of a layer's output: ‖y − ŷ‖² / ‖y‖²."""
    return float(((y - y_hat) ** 2).sum() / (y ** 2).sum().clamp_min(1e-30))


def refine(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, top_k: int, params: dict[str, torch.Tensor],
           masks: tuple[torch.Tensor, torch.Tensor], steps: int, lr_ratio: float, batch: int, seed: int,
           rank: int | None = None, router: torch.Tensor | None = None, tf32: bool = False
           ) -> dict[str, torch.Tensor]:
    """Gradient steps on every expert weight (gate, up and down, routed and shared) towards y, routing fixed
    (`weights` [T, N], top-`top_k`), or, given a `router` [N, H], routing by its top-`top_k` gate as it trains too
    (returned as "router"). Each step computes the chosen experts only on the CPU, every expert on a GPU
    (routed_output_form).

    params: gate, up [N·S, H]; down [H, N·S]; shared_gate, shared_up [shared, H]; shared_down [H, shared].
    masks (routed [N·S], shared [shared]) keep PAD slots zero neurons. Adam, each tensor at lr = lr_ratio × its own
    RMS (weights of very different sizes move by the same share of themselves), on seeded random token batches.
    rank: train a low-rank delta A·B per weight (LowRank) instead of every entry (FullDelta); a router trains in
    full. tf32: CUDA matmuls in TF32 for these steps only (the CPU ignores it)."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {k: LowRank(v, rank, lr_ratio, gen) if rank else FullDelta(v, lr_ratio) for k, v in params.items()}
    if router is not None:
        deltas["router"] = FullDelta(router, lr_ratio)
    # fused: one pass over the weights per step instead of one per Adam term, which was two thirds of a 7B layer's
    # step in TF32 on a GPU and is about 6% of a SmolLM2 layer's steps on a CPU (docs/benchmarks.md)
    opt = torch.optim.Adam([g for d in deltas.values() for g in d.groups()], fused=True)
    routed, shared = (m.to(x.dtype) for m in masks)
    energy = (y ** 2).sum(1).mean()
    with torch.enable_grad(), _cuda_tf32(tf32):  # the sequential runner holds no_grad around its layer passes
        _adam_steps(x, y, weights, top_k, deltas, routed, shared, energy, opt, gen, steps, batch)
    rows = {"gate": routed, "up": routed, "shared_gate": shared, "shared_up": shared}
    cols = {"down": routed, "shared_down": shared}
    with torch.no_grad():
        out = {k: deltas[k].weight().detach() * (rows[k][:, None] if k in rows else cols[k]) for k in params}
        if router is not None:
            out["router"] = deltas["router"].weight().detach()
        return out


@contextmanager
def _cuda_tf32(enabled: bool):
    """CUDA fp32 matmuls in TF32 inside the block, the caller's setting restored after it (a process-wide flag)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class FullDelta:
    """Every entry of the weight trains, at lr = lr_ratio × the weight's RMS."""

    def __init__(self, weight: torch.Tensor, lr_ratio: float):
        self.w = weight.clone().requires_grad_(True)
        self.lr = lr_ratio * float(weight.pow(2).mean().sqrt().clamp_min(1e-8))

    def groups(self) -> list[dict]:
        return [{"params": [self.w], "lr": self.lr}] if self.w.numel() else []

    def weight(self) -> torch.Tensor:
        return self.w


class LowRank:
    """W + A·B with A [out, r] from zero and B [r, in] random with unit-norm rows (LoRA's factorisation, over the
    whole layer's stacked experts, so every expert's delta lives in one shared r-dimensional input subspace). A's lr
    is set so that an entry of A·B moves about as far per step as FullDelta's would: lr_ratio × RMS(W)."""

    def __init__(self, weight: torch.Tensor, rank: int, lr_ratio: float, gen: torch.Generator):
        out, inp = weight.shape
        r = min(rank, out, inp)
        self.base = weight
        self.a = torch.zeros(out, r, dtype=weight.dtype, device=weight.device, requires_grad=True)
        b = torch.randn(r, inp, generator=gen, dtype=weight.dtype) / max(inp, 1) ** 0.5
        self.b = b.to(weight.device).requires_grad_(True)
        rms = float(weight.pow(2).mean().sqrt().clamp_min(1e-8)) if weight.numel() else 0.0
        self.lrs = (lr_ratio * rms * (max(inp, 1) / max(r, 1)) ** 0.5, lr_ratio / max(inp, 1) ** 0.5)

    def groups(self) -> list[dict]:
        if not self.base.numel():
            return []
        return [{"params": [self.a], "lr": self.lrs[0]}, {"params": [self.b], "lr": self.lrs[1]}]

    def weight(self) -> torch.Tensor:
        return self.base + self.a @ self.b


def _adam_steps(x, y, weights, top_k: int, deltas, routed, shared, energy, opt, gen, steps: int, batch: int
                ) -> None:
    # every step's batch drawn at once (the same numbers as one draw per step) and moved to the device in one copy: a
    # CPU index per step made each step wait for the last, and the GPU for the next step's kernel launches
    picks = torch.randint(0, len(x), (steps, min(batch, len(x))), generator=gen).to(x.device)
    held = None if "router" in deltas else weights.topk(top_k, dim=1)  # fixed routing: its top-k, found once
    routed_output = routed_output_form(x.device)
    for pick in picks:
        live = {k: d.weight() for k, d in deltas.items()}
        xb = x[pick]
        # a training router re-routes each batch: the choice of experts is not differentiable, their weights are
        if held is None:
            chosen, wb = top_k_gate(xb @ live["router"].T, top_k)
        else:
            chosen, wb = held.indices[pick], held.values[pick]
        a_sh = torch.nn.functional.silu(xb @ live["shared_gate"].T) * (xb @ live["shared_up"].T) * shared
        y_hat = (routed_output(xb, chosen, wb, weights.shape[1], live["gate"], live["up"], live["down"], routed)
                 + a_sh @ live["shared_down"].T)
        loss = ((y[pick] - y_hat) ** 2).sum(1).mean() / energy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
