"""Layer-wise reconstruction: fit each MoE layer's router and expert weights to the dense FFN, in layer order, on
the inputs the already-converted model produces (GPTQ/SparseGPT's sequential scheme), so each layer also absorbs the
drift of the layers before it. No LM loss and no backprop through the model.

Memory is one decoder layer plus the cached calibration hidden states, as in the profiler (profile/runner.py), and
the cost grows linearly with layers. Per MoE layer (construct/refit.py has the math):
  1. run the dense layer on the converted model's hidden states; keep the MLP inputs x and the residual stream
     before the MLP; the target y is the dense FFN's output on x (target "ffn"), or what would bring the residual
     stream back to the dense model's own (target "stream", which also corrects the attention's drift);
  2. for `rounds` rounds: fit the router towards the experts that best produce y, then, for each candidate logit
     temperature, solve all down projections at once in closed form (routing fixed, the problem is linear) and keep
     the temperature with the lowest layer error;
  3. the next layer's inputs come from this layer with its MoE output, as the exported model will compute them."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from moefy.construct import refit
from moefy.construct.plan import PAD, LayerPlan, MoEPlan
from moefy.construct.recipe import ReconstructOptions
from moefy.data.corpus import Corpus
from moefy.data.tokens import token_blocks
from moefy.families import Family
from moefy.models import compute_device, load_tokenizer
from moefy.profile.activations import activation_budget
from moefy.profile.runner import domain_batches, embed_blocks, materialise_layer, rotary_embeddings, spill_note
from moefy.progress import progress
from moefy.seeding import derived_seed
from moefy.sources import ModelSource
from moefy.tensor_io import LazyCheckpoint, SavedTensors

FITS_JSON = "reconstruction.json"
SPILL_DIR = "fitted.tmp"  # inside a build's temp output: each layer's fitted weights until the export writes them
CHUNK = 4096  # tokens per block of the design matrix (bounds its memory to CHUNK × N·S floats)


@dataclass(frozen=True)
class LayerFit:
    layer: int
    before: float  # normalised error of the layer as built, on inputs from the reconstructed layers before it
    after: float
    temperature: float | None  # the router's chosen logit temperature (None: the router was kept)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "nmse_before": self.before, "nmse_after": self.after,
                "temperature": self.temperature}


@dataclass(frozen=True)
class Layer:
    """One layer's dense FFN and its plan, as the fit sees them."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    plan: LayerPlan
    top_k: int


def _chunks(t: int):
    return [slice(s, min(s + CHUNK, t)) for s in range(0, t, CHUNK)]


def _rows(weight: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
    """The slots' neuron rows of a gate/up weight [I, H], PAD rows zero."""
    return refit.gather_slots(weight.T, slots).T.contiguous()


class _Design:
    """The closed form's design rows [chunk, N·S + shared] for one routing, made chunk by chunk from x: the routed
    block from each token's chosen experts (refit.routed_design_form), then the always-on shared block. No
    [T, N·S] activation matrix is held for the whole calibration set."""

    def __init__(self, x: torch.Tensor, logits: torch.Tensor, top_k: int, proj: dict[str, torch.Tensor], n: int):
        self.x, self.n, self.w = x, n, proj
        self.chosen, self.gates = refit.top_k_gate(logits, top_k)
        self.form = refit.routed_design_form(x.device)

    def rows(self, c: slice) -> torch.Tensor:
        x = self.x[c]
        routed = self.form(x, self.chosen[c], self.gates[c], self.n, self.w["gate"], self.w["up"])
        return torch.cat([routed, refit.activations(x, self.w["shared_gate"], self.w["shared_up"])], dim=1)

    def predict(self, down_exp: torch.Tensor, down_sh: torch.Tensor) -> torch.Tensor:
        """The layer's output with these down projections: rows @ [D_1 … D_N D_s]ᵀ, computed as the MoE layer
        computes it (refit.routed_output_form: on the CPU, the chosen experts only, not the design's zeros)."""
        routed_output = refit.routed_output_form(self.x.device)
        flat = down_exp.permute(1, 0, 2).reshape(down_exp.shape[1], -1)  # [H, N·S]
        live = torch.ones(flat.shape[1], dtype=flat.dtype, device=flat.device)  # PAD rows of gate/up are zero
        w, out = self.w, []
        for c in _chunks(len(self.x)):
            x = self.x[c]
            out.append(routed_output(x, self.chosen[c], self.gates[c], self.n, w["gate"], w["up"], flat, live)
                       + refit.activations(x, w["shared_gate"], w["shared_up"]) @ down_sh.T)
        return torch.cat(out)

    def solve(self, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        routed = self.w["gate"].shape[0]
        normal = refit.Normal(routed + self.w["shared_gate"].shape[0], y.shape[1], y.device)
        skip_zeros = refit.chosen_only(self.x.device)  # the products of the design's zero blocks are skipped too
        for c in _chunks(len(y)):
            if skip_zeros:
                normal.add_routed(self.rows(c), y[c], self.chosen[c], self.n, routed)
            else:
                normal.add(self.rows(c), y[c])
        return refit.split_downs(normal.solve(ridge), self.n, routed // self.n)


def fit_layer(x: torch.Tensor, y: torch.Tensor, layer: Layer, opts: ReconstructOptions, seed: int = 0
              ) -> tuple[LayerPlan, torch.Tensor, float, float, float | None]:
    """Fit one MoE layer to produce y from x; returns the new layer plan, its output on x, errors and temperature."""
    lp = layer.plan
    n, size = lp.experts.shape
    proj = {"gate": _rows(layer.gate, lp.experts), "up": _rows(layer.up, lp.experts),
            "shared_gate": _rows(layer.gate, lp.shared), "shared_up": _rows(layer.up, lp.shared)}
    down_exp = refit.gather_slots(layer.down, lp.experts).view(-1, n, size).permute(1, 0, 2) * lp.scale
    down_sh = refit.gather_slots(layer.down, lp.shared)
    router = lp.router.to(x.device)
    y_hat = _Design(x, x @ router.T, layer.top_k, proj, n).predict(down_exp, down_sh)
    before = refit.nmse(y, y_hat)
    best = (before, router, down_exp, down_sh, None, y_hat)  # each candidate keeps its output on x
    for _ in range(opts.rounds):
        if opts.router:
            # the router fit scores every expert on every token, so it needs all experts' activations
            a_exp = refit.activations(x, proj["gate"], proj["up"])
            residual = y - refit.activations(x, proj["shared_gate"], proj["shared_up"]) @ best[3].T
            base = refit.fit_router_logits(x, refit.contributions(a_exp, best[2], residual), opts.router_ridge)
            del a_exp, residual
            candidates = [(base / t, t) for t in refit.TEMPERATURES]
        else:
            candidates = [(best[1], None)]
        for router, t in candidates:
            design = _Design(x, x @ router.T, layer.top_k, proj, n)
            d_exp, d_sh = design.solve(y, opts.ridge)
            y_hat = design.predict(d_exp, d_sh)
            err = refit.nmse(y, y_hat)
            if err < best[0]:
                best = (err, router, d_exp, d_sh, t, y_hat)
            del y_hat
    err, router, d_exp, d_sh, t, y_hat = best
    fitted = {"down": d_exp, "shared_down": d_sh}
    if opts.steps:
        refined = _refine(x, y, refit.route(x @ router.T, layer.top_k), layer, proj, fitted, opts, seed,
                          router if opts.train_router else None)
        r_router = refined.pop("router", router)
        # PAD slots are masked to zero in the refined gate/up rows, so their activations are exactly 0 here too
        r_proj = {k: refined[k].reshape(-1, x.shape[1]) for k in proj}
        r_hat = _Design(x, x @ r_router.T, layer.top_k, r_proj, n).predict(refined["down"],
                                                                              refined["shared_down"])
        r_err = refit.nmse(y, r_hat)
        if r_err < err:  # steps that overshoot never replace the closed form
            fitted, err, router, y_hat = refined, r_err, r_router, r_hat
    if not lp.shared.size:  # no shared block: nothing to store for it
        fitted = {k: v for k, v in fitted.items() if not k.startswith("shared_")}
    fitted = {k: v.cpu() for k, v in fitted.items()}  # the plan lives on the CPU, whatever device fitted it
    return replace(lp, router=router.contiguous().cpu(), fitted=fitted), y_hat, before, err, t


def _refine(x, y, weights, layer: Layer, proj: dict, fitted: dict, opts: ReconstructOptions, seed: int,
            router: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Gradient steps on gate, up and down (and the router, if given) after the closed form, from the slots' gate/up
    rows and the fitted down projections; returns the fitted tensors in plan layout."""
    lp = layer.plan
    n, size = lp.experts.shape
    params = {**proj, "down": fitted["down"].permute(1, 0, 2).reshape(layer.down.shape[0], -1),
              "shared_down": fitted["shared_down"]}
    masks = tuple(torch.from_numpy(live).to(x.device) for live in (lp.experts.reshape(-1) != PAD, lp.shared != PAD))
    out = refit.refine(x, y, weights, layer.top_k, params, masks, opts.steps, opts.lr_ratio, opts.step_tokens, seed,
                       opts.delta_rank, router, opts.step_matmul == "tf32")
    return {**({"router": out["router"]} if router is not None else {}),
            "gate": out["gate"].view(n, size, -1), "up": out["up"].view(n, size, -1),
            "down": out["down"].view(-1, n, size).permute(1, 0, 2).contiguous(),
            "shared_gate": out["shared_gate"], "shared_up": out["shared_up"], "shared_down": out["shared_down"]}


def reconstruct(plan: MoEPlan, source: ModelSource, family: Family, corpus: Corpus, opts: ReconstructOptions,
                seed: int, device: str = "auto", spill: Path | None = None, max_memory: str | None = None
                ) -> tuple[MoEPlan, list[LayerFit]]:
    """spill: a directory for each layer's fitted weights as it is done (SavedTensors), so memory holds one
    layer's, not the model's (a 7B model's fitted experts are several GB); None keeps them in memory.
    max_memory: the budget of the hidden states carried between layers (profile/activations.py); above it they
    wait on disk. A layer's own inputs, targets and activations are in memory while it is fitted."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = compute_device(device)
    if spill is not None:
        spill.mkdir(parents=True, exist_ok=True)
    tokens = token_blocks(corpus, load_tokenizer(source.directory), opts.seq_len, opts.tokens_per_domain, seed)
    config = AutoConfig.from_pretrained(source.directory)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    reader = LazyCheckpoint(source.directory)
    batches = [ids for _, ids, _ in domain_batches(tokens, opts.batch_size)]
    copies = 2 if opts.target == "stream" else 1  # the converted model's stream, and the dense model's
    budget = activation_budget(max_memory, dev) // copies
    hidden = embed_blocks(reader, batches, dev, budget)
    dense_hidden = hidden.copy(budget) if opts.target == "stream" else None
    rope, positions = rotary_embeddings(skeleton, config, hidden[0], tokens.seq_len)
    h = config.hidden_size
    layers, fits = dict(plan.layers), []
    for i in progress(range(config.num_hidden_layers), "reconstructing layers" + spill_note(hidden)):
        layer = skeleton.model.layers[i]
        materialise_layer(layer, reader, family.layer_prefix.format(layer=i), dev)
        seen: dict = {}
        hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0])),
                 layer.mlp.register_forward_hook(lambda m, args, out: seen.__setitem__("y", out))]
        xs, ys, mids = [], [], []
        with torch.no_grad():
            for b in range(len(hidden)):
                out = layer(hidden[b], position_embeddings=rope, position_ids=positions)
                xs.append(seen["x"].reshape(-1, h))
                ys.append(seen["y"].reshape(-1, h))
                mids.append(out - seen["y"])  # the residual stream before the MLP
                hidden[b] = out
            for hook in hooks:
                hook.remove()
            if dense_hidden is not None:
                for b in range(len(dense_hidden)):
                    dense_hidden[b] = layer(dense_hidden[b], position_embeddings=rope, position_ids=positions)
                ys = [(d - m).reshape(-1, h) for d, m in zip(dense_hidden, mids)]
            if i in plan.layers:
                # the dense FFN as the materialised layer holds it (fp32, on the device): no second copy is read
                ffn = {w: layer.get_parameter(getattr(family, w)).detach() for w in ("gate", "up", "down")}
                x, y = torch.cat(xs), torch.cat(ys)
                layers[i], y_hat, before, after, t = fit_layer(x, y, Layer(**ffn, plan=plan.layers[i],
                                                                        top_k=plan.meta.top_k), opts,
                                                               derived_seed(seed, i))
                fits.append(LayerFit(i, before, after, t))
                if spill is not None:
                    on_disk = SavedTensors(layers[i].fitted, spill / f"layer-{i}.safetensors")
                    layers[i] = replace(layers[i], fitted=on_disk)
                for b, part in enumerate(y_hat.split([len(xb) for xb in xs])):
                    hidden[b] = mids[b] + part.view_as(mids[b])
        layer.to("meta")  # free this layer's weights before the next one is read
    result = MoEPlan(plan.meta, layers)
    result.validate()
    return result, fits


def save_fits(directory: Path, fits: list[LayerFit]) -> None:
    """reconstruction.json: each MoE layer's error before and after (the caller draws reconstruction.png)."""
    (directory / FITS_JSON).write_text(json.dumps([f.to_dict() for f in fits], indent=2))
