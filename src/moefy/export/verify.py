"""`moefy verify`: load the MoE and the dense source with stock transformers and check the exactness invariant
(all experts active, uniform router => dense logits), plus a probe perplexity of the MoE as built."""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from moefy.construct.plan import PAD, load_plan, pad_to
from moefy.data.probe import PROBE_TEXTS
from moefy.errors import MoefyError
from moefy.export.formats import FORMATS, gather_neurons
from moefy.export.oracle import active_fraction, expert_oracle, neuron_oracle
from moefy.export.vllm_check import vllm_problems
from moefy.families import family_for
from moefy.models import load_in_float32, load_tokenizer, stored_dtype
from moefy.progress import progress
from moefy.sources import read_config, resolve_model
from moefy.tensor_io import LazyCheckpoint

PROBE_MAX_TOKENS = 256


# A routing decision whose k-th and (k+1)-th logits are this close, as a share of the token's logit spread (std over
# experts), is decided by rounding. Relative, because a router's logit scale is free: carve's fitted routers choose
# a scale of ~1e-3 (uniform weights fit best), so an absolute threshold called most decisions tied whatever their
# margins, while rounding noise shrinks with the logits.
NEAR_TIE = 1e-3


@dataclass(frozen=True)
class VerifyReport:
    check: str  # "uniform": all experts + uniform router vs dense; "per-expert": each token through one expert alone
    # (token t: expert t mod N) vs the dense model restricted to that expert at that token
    max_abs_dlogits: float
    dense_loss: float
    uniform_moe_loss: float  # the checked configuration's loss (for "uniform": should equal dense_loss)
    built_moe_loss: float  # the MoE as built (top-k, its own router)
    tokens: int
    total_params: int
    active_params: int
    dense_params: int
    tolerance: float  # on |Δlogits| per 10 units of the reference logits' magnitude (at least the absolute value)
    logit_scale: float  # max |reference logits|
    active_fraction: float  # FFN neurons computed per token / dense FFN width
    expert_oracle_loss: float  # the build's experts, routed by an oracle that knows their outputs (export/oracle.py)
    neuron_oracle_loss: float  # each token's own top neurons at the same active fraction
    near_tie_fraction: float  # token × layer routing decisions within NEAR_TIE of a tie (relative to the spread)
    bf16_flip_fraction: float  # token × layer routing decisions that change when the router computes in bf16
    vllm_problems: list[str]  # what would stop vLLM from computing the same function (export/vllm_check.py)

    @property
    def allowed(self) -> float:
        # fp32 sums over thousands of neurons and 30 layers round in proportion to the logits' size; a pruned
        # reference (per-expert check) can have logits several times larger than the dense model's.
        return self.tolerance * max(1.0, self.logit_scale / 10)

    @property
    def passed(self) -> bool:
        return self.max_abs_dlogits < self.allowed

    @property
    def built_moe_ppl(self) -> float:
        return math.exp(min(self.built_moe_loss, 700.0))

    @property
    def dense_ppl(self) -> float:
        return math.exp(self.dense_loss)

    @property
    def expert_oracle_ppl(self) -> float:
        return math.exp(min(self.expert_oracle_loss, 700.0))

    @property
    def neuron_oracle_ppl(self) -> float:
        return math.exp(min(self.neuron_oracle_loss, 700.0))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed, "built_moe_ppl": self.built_moe_ppl,
                           "dense_ppl": self.dense_ppl, "expert_oracle_ppl": self.expert_oracle_ppl,
                           "neuron_oracle_ppl": self.neuron_oracle_ppl}, indent=2)


def probe_batch(directory: Path, texts=PROBE_TEXTS) -> list[torch.Tensor]:

    tok = load_tokenizer(directory)
    return [tok(t, return_tensors="pt").input_ids[:, :PROBE_MAX_TOKENS] for t in texts]


@torch.no_grad()
def _run(model, batch: list[torch.Tensor], what: str) -> tuple[list[torch.Tensor], float]:
    logits, nll, count = [], 0.0, 0
    for ids in progress(batch, f"verify: {what}"):  # a 7B pass over the probe takes minutes on a CPU
        out = model(input_ids=ids).logits.float()
        logits.append(out)
        nll += torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return logits, nll / count


def verify(moe_dir: Path, dense: str, tolerance: float = 1e-3) -> VerifyReport:
    moe_dir = Path(moe_dir)
    plan = load_plan(moe_dir)
    config = read_config(moe_dir)
    fmt = FORMATS.get(config.get("model_type"))
    if fmt is None:
        raise MoefyError(f"{moe_dir} is a {config.get('model_type')!r} model; verify handles: {', '.join(FORMATS)}")
    batch = probe_batch(moe_dir)
    # Compare at the MoE's storage precision: a bf16 MoE is checked against the dense weights rounded to bf16,
    # computed in float32. Where memory is short, the models stay at that precision and are read as float32; the
    # weights the checks below write into are float32 parameters then too.
    storage = stored_dtype(config)
    dense_dir = resolve_model(dense).directory
    partition = plan.meta.coverage == "partition"
    dense_model = load_in_float32(dense_dir, storage, _written_in_dense(plan))
    dense_logits, dense_loss = _run(dense_model, batch, "dense")
    dense_params = sum(p.numel() for p in dense_model.parameters())
    fraction = active_fraction(plan)
    with expert_oracle(dense_model, plan):
        _, expert_loss = _run(dense_model, batch, "expert oracle")
    with neuron_oracle(dense_model, fraction):
        _, neuron_loss = _run(dense_model, batch, "neuron oracle")
    # The check's reference is all the dense model gives the MoE's checks: take it, then free the dense model
    # before the MoE loads, so a 7B pair needs the memory of one model.
    if partition and storage != torch.float32:
        _round_as_stored(dense_model, dense_dir, plan, storage)
        dense_logits, _ = _run(dense_model, batch, "dense, rounded as stored")
    references = dense_logits if partition else _restricted_logits(dense_model, plan, batch)
    del dense_model
    gc.collect()
    moe = load_in_float32(moe_dir, storage, _written_in_moe(plan))
    _, built_loss = _run(moe, batch, "MoE as built")
    ties, flips = _routing_margins(moe, batch, plan.meta.top_k)
    total = sum(p.numel() for p in moe.parameters())
    _restore_construction(moe, dense_dir, plan, storage)
    if partition:
        check = "uniform"
        fmt.all_experts_uniform(moe, plan.meta)
        moe_logits, uniform_loss = _run(moe, batch, "all experts, uniform router")
    else:
        check = "per-expert"
        moe_logits, uniform_loss = _assigned_logits(moe, plan, batch)
    delta = max((a - b).abs().max().item() for a, b in zip(moe_logits, references))
    scale = max(a.abs().max().item() for a in references)
    return VerifyReport(check, delta, dense_loss, uniform_loss, built_loss, sum(b.shape[1] for b in batch), total,
                        plan.meta.active_params(total), dense_params, tolerance, scale, fraction, expert_loss,
                        neuron_loss, ties, flips, vllm_problems(moe_dir))


def _written_in_dense(plan) -> Callable[[str, torch.nn.Parameter], bool]:
    # _round_as_stored sets a partition's MoE layers' down-projection columns (_restricted_logits writes none).
    partition = plan.meta.coverage == "partition"
    names = {f"model.layers.{i}.mlp.down_proj.weight" for i in plan.meta.moe_layers} if partition else set()
    return lambda name, param: name in names


def _written_in_moe(plan) -> Callable[[str, torch.nn.Parameter], bool]:
    # all_experts_uniform zeroes the routers and rescales the experts' down projections in place; _per_expert_delta
    # zeroes re-initialised columns; _restore_construction writes fitted layers' down projections, scaled in float32.
    # Their other tensors get dense slices the storage dtype holds exactly, written into the stored tensors.
    names = {f"model.layers.{i}.mlp.{n}" for i in plan.meta.moe_layers
             for n in ("gate.weight", "experts.down_proj", "shared_expert.down_proj.weight")}
    return lambda name, param: name in names


def _stored(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor a weight is stored in: behind models.read_as_float32's parametrization, its original."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


@torch.no_grad()
def router_inputs(moe, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One forward: its logits, and each MoE layer's (router weight, router input [tokens, hidden])."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    routers = [layer.mlp.gate for layer in moe.model.layers if hasattr(layer.mlp, "experts")]
    hooks = [r.register_forward_pre_hook(lambda m, args: seen.append((m.weight, args[0]))) for r in routers]
    try:
        logits = moe(input_ids=ids).logits.float()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, [(w, x.reshape(-1, x.shape[-1])) for w, x in seen]


@torch.no_grad()
def routing_decisions(weight: torch.Tensor, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Per token: the chosen experts (sorted), whether the choice is near-tied (NEAR_TIE), and the experts a bf16
    router chooses from the same input (sorted)."""
    x = x.float()
    logits = x @ weight.float().T
    top = logits.topk(top_k + 1, dim=-1)
    tied = top.values[:, -2] - top.values[:, -1] <= NEAR_TIE * logits.std(dim=-1)
    low = (x.bfloat16() @ weight.bfloat16().T).float().topk(top_k, dim=-1).indices
    return top.indices[:, :-1].sort(-1).values, tied, low.sort(-1).values


def _routing_margins(moe, batch: list[torch.Tensor], top_k: int) -> tuple[float, float]:
    """Shares of token × layer routing decisions that are near-tied (NEAR_TIE) and that change when the same router
    inputs meet the router in bf16, as a GPU client runs it: how much of the routing rounding decides."""
    ties = flips = total = 0
    for ids in progress(batch, "verify: routing margins"):
        for weight, x in router_inputs(moe, ids)[1]:
            if weight.shape[0] <= top_k:
                continue  # every expert is chosen: there is no decision to flip
            chosen, tied, low = routing_decisions(weight, x, top_k)
            ties += int(tied.sum())
            flips += int((chosen != low).any(-1).sum())
            total += len(x)
    return ties / max(total, 1), flips / max(total, 1)


def _round_as_stored(dense_model, source: Path, plan, storage: torch.dtype) -> None:
    """The uniform check's reference at the MoE's storage precision, in place. A build scales each routed neuron's
    down-projection column by the layer's scale in fp32 and rounds the product to the storage dtype; in bf16, with a
    scale that is not a power of two (a fitted router's), that product divided by the scale is up to 2⁻⁹ away from
    the dense weight, enough to fail a correct build. So the reference's routed columns are rounded the same way,
    from the source's own weights. Fitted layers are skipped: _restore_construction puts their slices back in fp32."""
    reader = LazyCheckpoint(source)
    family = family_for(read_config(source))
    for i, lp in plan.layers.items():
        if i in plan.meta.fitted:
            continue
        routed = torch.from_numpy(lp.experts[lp.experts != PAD])
        stored = (reader.get(family.ffn_key(i, "down"))[:, routed].float() * lp.scale).to(storage).float()
        with torch.no_grad():
            dense_model.model.layers[i].mlp.down_proj.weight[:, routed] = stored / lp.scale


def _restore_construction(moe, source: Path, plan, storage: torch.dtype) -> None:
    """A reconstructed build's fitted expert weights are, by design, not the dense slices: the exactness check is of
    the construction (partition, slicing, scale, export), so put the slices back for it, from the source's weights
    at the MoE's storage precision. The fit itself is reported as per-layer errors in reconstruction.json."""
    reader = LazyCheckpoint(source)
    family = family_for(read_config(source))
    for i, lp in plan.layers.items():
        if i not in plan.meta.fitted:
            continue
        mlp = moe.model.layers[i].mlp
        dense = {w: reader.get(family.ffn_key(i, w)).to(storage).float() for w in ("gate", "up", "down")}
        with torch.no_grad():
            gate_up = _stored(mlp.experts, "gate_up_proj")
            for e, row in enumerate(torch.from_numpy(lp.experts)):
                mlp.experts.down_proj[e].copy_(gather_neurons(dense["down"], row, 1) * lp.scale)
                gate_up[e].copy_(torch.cat([gather_neurons(dense["gate"], row, 0),
                                            gather_neurons(dense["up"], row, 0)]))
            if hasattr(mlp, "shared_expert"):
                shared = mlp.shared_expert
                row = torch.from_numpy(pad_to(lp.shared_neurons, shared.down_proj.weight.shape[1]))
                shared.down_proj.weight.copy_(gather_neurons(dense["down"], row, 1) * 2.0)
                _stored(shared.gate_proj, "weight").copy_(gather_neurons(dense["gate"], row, 0))
                _stored(shared.up_proj, "weight").copy_(gather_neurons(dense["up"], row, 0))


def _assigned(tokens: int, num_experts: int) -> torch.Tensor:
    """The per-expert check's routing: token t of a probe text goes to expert t mod N in every layer. One pass then
    checks every expert, each on a share of the tokens, which is enough: a wrongly built expert changes the logits of
    every token it computes."""
    return torch.arange(tokens) % num_experts


def _force_assigned(model, meta) -> None:
    """Route each token to its _assigned expert with weight 1, through the stock experts (and shared) modules."""
    for i in meta.moe_layers:
        mlp = model.model.layers[i].mlp

        def forward(hidden, mlp=mlp):
            flat = hidden.reshape(-1, hidden.shape[-1])
            index = _assigned(flat.shape[0], meta.num_experts)[:, None]
            out = mlp.experts(flat, index, torch.ones(flat.shape[0], 1))
            if hasattr(mlp, "shared_expert"):
                out = out + torch.sigmoid(mlp.shared_expert_gate(flat)) * mlp.shared_expert(flat)
            return out.reshape(hidden.shape)

        mlp.forward = forward


@torch.no_grad()
def _restricted_logits(dense_model, plan, batch) -> list[torch.Tensor]:
    """The per-expert check's reference: the dense model's probe logits with each MoE layer's FFN, at each token,
    restricted to the copied neurons (scaled) of its _assigned expert and to the shared ones. The restriction
    multiplies down_proj's input, so no weight is written."""
    hooks = []
    for i, lp in plan.layers.items():
        masks = torch.zeros(plan.meta.num_experts, plan.meta.ffn_width)
        for e, row in enumerate(lp.experts):
            copied = row != PAD
            if lp.reinit is not None:  # re-initialised neurons are new by design: check all the others
                copied &= ~lp.reinit[e]
            masks[e, torch.from_numpy(row[copied])] = lp.scale
        masks[:, torch.from_numpy(lp.shared_neurons)] = 1.0

        def restrict(module, args, masks=masks):
            flat = args[0].reshape(-1, masks.shape[1])
            return ((flat * masks[_assigned(flat.shape[0], len(masks))]).reshape(args[0].shape),)

        hooks.append(dense_model.model.layers[i].mlp.down_proj.register_forward_pre_hook(restrict))
    try:
        return _run(dense_model, batch, "dense restricted to each token's expert")[0]
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def _assigned_logits(moe, plan, batch) -> tuple[list[torch.Tensor], float]:
    """The MoE with each token through its _assigned expert alone (and the shared block), re-initialised neurons
    zeroed: the function _restricted_logits computes in the dense model."""
    for i, lp in plan.layers.items():
        if lp.reinit is not None:
            for e, fresh in enumerate(lp.reinit):
                moe.model.layers[i].mlp.experts.down_proj[e][:, torch.from_numpy(fresh)] = 0
    _force_assigned(moe, plan.meta)
    return _run(moe, batch, "each token's expert alone")
