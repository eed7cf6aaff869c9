"""DIVE's global steps, run before the per-layer plan: settle the calibration domains (labels, discovered
pseudo-domains, or labels with the largest domains split), mine their affinity, group them into one group per
expert, and measure what dropping FLAP's bias compensation costs. Everything it decides is saved next to the
output (dive/mining.json, affinity.png, dendrogram.png) and the groups go into the plan."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from moefy.construct.dive import dendrogram_linkage, group_domains, loss_affinity, mask_iou, overlap_stats
from moefy.construct.domains import (
    cluster_documents,
    describe_clusters,
    embed_documents,
    holdout_split,
    relabel,
    split_largest,
)
from moefy.construct.methods import dive_experts
from moefy.construct.plan import MoEPlan
from moefy.construct.recipe import BuildRecipe
from moefy.data.corpus import Corpus
from moefy.errors import MoefyError
from moefy.families import Family
from moefy.models import load_causal_lm, load_tokenizer
from moefy.profile.perplexity import heldout_perplexity
from moefy.profile.stats import NeuronStats
from moefy.sources import ModelSource
from moefy.tensor_io import LazyCheckpoint

MINING_DIR = "dive"


@dataclass(frozen=True)
class DiveDomains:
    prune: Corpus  # documents whose activations score the neurons
    heldout: Corpus  # documents for the cross-domain loss
    discovery: dict | None  # how pseudo-domains were made, with descriptions; None when the labels were used as is


@dataclass(frozen=True)
class DiveMining:
    domains: list[str]
    groups: list[list[int]]
    iou: np.ndarray
    cross_loss: np.ndarray | None  # [pruned on i, evaluated on j]
    affinity: np.ndarray
    compensation: dict[str, dict[str, float]] | None  # domain -> held-out loss: dense, pruned, pruned + FLAP bias
    discovery: dict | None

    def group_names(self) -> list[list[str]]:
        return [[self.domains[d] for d in g] for g in self.groups]

    def linkage(self) -> np.ndarray:
        """The average-linkage merge tree of 1 − affinity, as scipy's dendrogram draws it."""
        return dendrogram_linkage(self.affinity)

    def save(self, directory: Path, plan: MoEPlan) -> None:
        """mining.json: domains, groups, affinities, bias-compensation cost, discovery, expert overlap per layer.
        The caller draws the pictures (analyze.plots), so construction knows no plotting."""
        directory.mkdir(parents=True, exist_ok=True)
        overlap = {i: overlap_stats([row[row >= 0] for row in layer.experts], plan.meta.ffn_width)
                   for i, layer in plan.layers.items()}
        (directory / "mining.json").write_text(json.dumps({
            "expert_overlap": {"mean": {k: float(np.mean([o[k] for o in overlap.values()])) for k in
                                        next(iter(overlap.values()))}, "per_layer": overlap},
            "domains": self.domains, "groups": self.group_names(), "affinity": self.affinity.tolist(),
            "mask_iou": self.iou.tolist(),
            "cross_domain_loss": None if self.cross_loss is None else self.cross_loss.tolist(),
            "bias_compensation": self.compensation, "discovery": self.discovery}, indent=2))


def settle_domains(recipe: BuildRecipe, source: ModelSource, corpus: Corpus) -> DiveDomains:

    opts, labels = recipe.dive, [d.domain for d in corpus.docs]
    discovery = None
    unlabelled = len(set(labels)) == 1
    if opts.discover_domains or unlabelled or len(set(labels)) < recipe.experts:
        model, tok = load_causal_lm(source.directory), load_tokenizer(source.directory)
        texts = [d.text for d in corpus.docs]
        cache: dict[int, np.ndarray] = {}

        def embed(indices: list[int]) -> np.ndarray:
            """Embeddings of these documents, computed once and only when asked: splitting labelled domains
            embeds only the documents of the domains it splits."""
            todo = [i for i in indices if i not in cache]
            if todo:
                cache.update(zip(todo, embed_documents(model, tok, [texts[i] for i in todo], opts.embed_tokens)))
            return np.stack([cache[i] for i in indices])

        discovery = {"embedding": f"mean of the dense model's last hidden state over each document's first "
                                  f"{opts.embed_tokens} tokens"}
        try:
            if opts.discover_domains or unlabelled:
                m = opts.discover_domains or recipe.experts
                ids = cluster_documents(embed(list(range(len(texts)))), m, recipe.seed)
                labels = [f"pseudo-{c}" for c in ids]
                discovery["pseudo_domains"] = m
            if len(set(labels)) < recipe.experts:  # fewer domains than experts: split the largest ones
                labels, origin = split_largest(labels, embed, recipe.experts, recipe.seed)
                discovery["split"] = origin
        except ValueError as exc:
            raise MoefyError(f"dive: {exc}") from exc
        # The clusters this step made (pseudo-domains, or the halves of split domains), described from the
        # documents it embedded.
        seen = sorted(cache)
        names = sorted({labels[i] for i in seen})
        index = np.array([names.index(labels[i]) for i in seen])
        discovery["clusters"] = describe_clusters([texts[i] for i in seen], index, embed(seen), tok, names)
        discovery["assignment"] = labels
    prune, heldout = holdout_split(relabel(corpus, labels), opts.affinity_fraction)
    return DiveDomains(prune, heldout, discovery)


def domain_masks(stats: NeuronStats, reader: LazyCheckpoint, family: Family, layers: list[int], recipe: BuildRecipe
                 ) -> dict[int, list[np.ndarray]]:
    """Per MoE layer: each domain's kept neurons when pruned on that domain alone."""
    singletons = [[d] for d in range(len(stats.meta.domains))]
    return {i: dive_experts(layer_stats(stats, i), reader.get(family.ffn_key(i, "down")).float(), singletons, recipe)
            for i in layers}


def layer_stats(stats: NeuronStats, i: int) -> dict[str, torch.Tensor]:
    out = dict(stats.layer(i))
    out["domain_tokens"] = torch.tensor(stats.meta.tokens, dtype=torch.float64)
    return out


@contextmanager
def pruned(model, kept: dict[int, np.ndarray], fill: dict[int, torch.Tensor] | None = None):
    """The dense model with each listed layer's FFN restricted to the kept neurons, by slicing gate/up rows and
    down columns for the duration: the pruned model then costs what it computes (DIVE keeps 1/experts of each FFN),
    where masking activations would pay for the whole FFN. With `fill`, pruned neurons output their mean instead of
    0 (FLAP's bias compensation), added as the constant W_down[:, pruned]·E[a_pruned]."""
    saved, hooks = [], []
    for i, idx in kept.items():
        mlp = model.model.layers[i].mlp
        keep = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        full = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        saved.append((mlp, full))
        for proj, weight in zip((mlp.gate_proj, mlp.up_proj), full[:2]):
            proj.weight = torch.nn.Parameter(weight.detach()[keep], requires_grad=False)
        mlp.down_proj.weight = torch.nn.Parameter(full[2].detach()[:, keep], requires_grad=False)
        if fill is not None:
            dropped = torch.ones(full[2].shape[1], dtype=torch.bool)
            dropped[keep] = False
            const = full[2].detach()[:, dropped].float() @ fill[i][dropped].float()

            def add(module, args, out, const=const):
                return out + const.to(out.dtype)

            hooks.append(mlp.register_forward_hook(add))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        for mlp, (gate, up, down) in saved:
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight = gate, up, down


def mine(recipe: BuildRecipe, source: ModelSource, family: Family, reader: LazyCheckpoint, stats: NeuronStats,
         domains: DiveDomains, layers: list[int]) -> DiveMining:
    names = stats.meta.domains
    masks = domain_masks(stats, reader, family, layers, recipe)
    width = stats.meta.ffn_width
    iou = mask_iou([masks[i] for i in layers], width)
    cross = compensation = None
    if recipe.dive.affinity in ("loss", "both"):
        cross, compensation = _cross_losses(recipe, source, stats, domains.heldout, masks, names)
    if recipe.dive.affinity == "iou":
        affinity = iou
    elif recipe.dive.affinity == "loss":
        affinity = loss_affinity(cross)
    else:
        affinity = (iou + loss_affinity(cross)) / 2
    try:
        groups = group_domains(affinity, recipe.experts)
    except ValueError as exc:
        raise MoefyError(f"dive: {exc}") from exc
    return DiveMining(names, groups, iou, cross, affinity, compensation, domains.discovery)


def _cross_losses(recipe, source, stats, heldout: Corpus, masks, names):

    model, tok = load_causal_lm(source.directory), load_tokenizer(source.directory)
    opts, seq_len = recipe.dive, recipe.profile.seq_len

    def losses(corpus):
        return heldout_perplexity(model, tok, corpus, seq_len, opts.affinity_tokens_per_domain).per_domain

    dense = losses(heldout)
    layer_means = {i: stats.layer(i)["mean"] for i in masks}  # [D, I] per layer, read once (layers hold samples too)
    cross = np.zeros((len(names), len(names)))
    compensation = {}
    for d, name in enumerate(names):
        kept = {i: m[d] for i, m in masks.items()}
        with pruned(model, kept):
            row = losses(heldout)
        cross[d] = [row[n] for n in names]
        own = replace(heldout, docs=tuple(doc for doc in heldout.docs if doc.domain == name))
        with pruned(model, kept, fill={i: m[d] for i, m in layer_means.items()}):
            compensated = losses(own)[name]
        compensation[name] = {"dense": dense[name], "pruned": row[name], "pruned_with_bias": compensated}
    return cross, compensation
