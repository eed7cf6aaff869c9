"""The calibration pass. Forward statistics are gathered layer by layer (llm-compressor's sequential pipeline):
embed every calibration block once, then materialise one decoder layer at a time from the lazy checkpoint, run it
over all cached hidden states, and drop it. Memory is one layer plus the cached activations, whatever the model size.

Data-parallel under torchrun (a process group initialised by the caller): the statistics are sums over batches, so
each process runs every layer over its share of the batches (and caches only those activations), the sums are
all-reduced after each layer, the sampled rows gathered in batch order, and process 0 writes the same stats one
process would."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import torch

from moefy.data.corpus import Corpus
from moefy.data.tokens import TokenBlocks, token_blocks
from moefy.errors import MoefyError
from moefy.families import Family
from moefy.host_memory import release_freed
from moefy.models import compute_device, load_causal_lm, load_tokenizer
from moefy.profile.activations import Activations, activation_budget
from moefy.profile.options import ProfileOptions
from moefy.profile.stats import NeuronStats, StatsMeta, load_stats, save_meta, stats_writer
from moefy.progress import progress
from moefy.sources import ModelSource, cache_dir
from moefy.tensor_io import LazyCheckpoint
from moefy.tensor_writer import TensorSpec

MOMENTS = ("abs_mean", "mean", "sq_mean", "gate_freq", "top_freq")  # per domain and neuron, means over tokens


def profile_cached(source: ModelSource, family: Family, corpus: Corpus, opts: ProfileOptions, seed: int,
                   device: str = "auto", max_memory: str | None = None) -> NeuronStats:
    """Profile once per (model, corpus, options, seed); later builds reuse the saved stats, wherever they ran (the
    device changes only float rounding; the memory budget, nothing)."""
    key = hashlib.sha256(json.dumps({
        "model": str(source.directory.resolve()), "config": source.config(), "options": opts.model_dump(), "seed": seed,
        "corpus": hashlib.sha256("\x00".join(f"{d.domain}\x01{d.text}" for d in corpus.docs).encode()).hexdigest(),
    }, sort_keys=True, default=str).encode()).hexdigest()[:20]
    target = cache_dir() / "stats" / key
    if (target / "stats.json").is_file():
        return load_stats(target)
    rank, world = _process()
    tmp = target.with_name(f".{key}.tmp-{os.getpid()}") if rank == 0 else None  # every process computes; 0 writes
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed run that had this pid
    try:
        profile(source, family, corpus, opts, seed, tmp, device, max_memory)
        if tmp is not None:
            tmp.rename(target)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()  # the others read what process 0 wrote (a cache on a shared filesystem)
    return load_stats(target)


def _process() -> tuple[int, int]:
    """(rank, world size) of this process in an initialised torch.distributed group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def profile(source: ModelSource, family: Family, corpus: Corpus, opts: ProfileOptions, seed: int, out,
            device: str = "auto", max_memory: str | None = None) -> NeuronStats | None:
    """Write the stats to `out` and return them; under a data-parallel launch, only the process that passes an
    `out` writes (the others pass None and get None). max_memory: the budget of the cached activations
    (profile/activations.py), e.g. "8GiB"; above it they wait on disk between layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = compute_device(device)
    tokens = token_blocks(corpus, load_tokenizer(source.directory), opts.seq_len, opts.tokens_per_domain, seed)
    config = AutoConfig.from_pretrained(source.directory)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    reader = LazyCheckpoint(source.directory)
    width, hidden_size, n_layers = config.intermediate_size, config.hidden_size, config.num_hidden_layers
    D = len(tokens.domains)
    batches = domain_batches(tokens, opts.batch_size)
    picks = _sample_positions(tokens, batches, opts.sample_tokens, seed)
    rank, world = _process()
    if len(batches) < world:
        raise MoefyError(f"{world} processes for {len(batches)} calibration batches: launch fewer processes, or "
                         "give more calibration tokens")
    mine = list(range(rank, len(batches), world))  # this process's batches (all of them in one process)
    hidden = embed_blocks(reader, [batches[b][1] for b in mine], dev, activation_budget(max_memory, dev))
    rope, positions = rotary_embeddings(skeleton, config, hidden[0], tokens.seq_len)
    top_k = max(1, round(opts.top_fraction * width))

    sample_domain = torch.cat([torch.full((len(p),), d, dtype=torch.int64) for (d, _, _), p in zip(batches, picks)])
    n_samples = len(sample_domain)
    per_layer = [(k, (D, width), torch.float64) for k in MOMENTS] + [
        ("hidden", (n_samples, hidden_size), torch.float16), ("abs_act", (n_samples, width), torch.float16)]
    specs = [TensorSpec("sample_domain", (n_samples,), torch.int64)]
    specs += [TensorSpec(f"layers.{i}.{k}", shape, dtype) for i in range(n_layers) for k, shape, dtype in per_layer]
    if opts.taylor:
        specs += [TensorSpec(f"layers.{i}.taylor", (D, width), torch.float64) for i in range(n_layers)]
    writer = stats_writer(out, specs) if out is not None else None
    if writer is not None:
        writer.write("sample_domain", sample_domain)
    for i in progress(range(n_layers), "profiling layers" + spill_note(hidden)):
        layer = skeleton.model.layers[i]
        materialise_layer(layer, reader, family.layer_prefix.format(layer=i), dev)
        acc = {k: torch.zeros(D, width, dtype=torch.float64, device=dev) for k in MOMENTS}
        count = torch.zeros(D, dtype=torch.float64, device=dev)
        samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> (x, |a|) rows at its sampled positions
        current: dict = {}
        mlp = layer.mlp
        hooks = [
            mlp.register_forward_pre_hook(lambda m, args: current.__setitem__("x", args[0])),
            mlp.gate_proj.register_forward_hook(lambda m, args, out: current.__setitem__("g", out)),
            mlp.down_proj.register_forward_pre_hook(lambda m, args: current.__setitem__("a", args[0])),
        ]
        with torch.no_grad():
            for j, b in enumerate(mine):
                d = batches[b][0]
                hidden[j] = layer(hidden[j], position_embeddings=rope, position_ids=positions)
                # Per-batch sums in fp32 (a few thousand tokens), accumulated across batches in fp64.
                a = current["a"].reshape(-1, width)
                g = current["g"].reshape(-1, width)
                a_abs = a.abs()
                acc["abs_mean"][d] += a_abs.sum(0)
                acc["mean"][d] += a.sum(0)
                acc["sq_mean"][d] += (a * a).sum(0)
                acc["gate_freq"][d] += (g > 0).sum(0)
                top = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a_abs.topk(top_k, dim=1, sorted=False).indices, True)
                acc["top_freq"][d] += top.sum(0)
                count[d] += a.shape[0]
                samples[b] = (current["x"].reshape(-1, hidden_size)[picks[b]].half().cpu(),
                              a_abs[picks[b]].half().cpu())
        for h in hooks:
            h.remove()
        layer.to("meta")  # free this layer's weights before the next one is read
        if world > 1:
            for v in (*acc.values(), count):
                torch.distributed.all_reduce(v)
            shares: list = [None] * world
            torch.distributed.all_gather_object(shares, samples)
            samples = {b: rows for share in shares for b, rows in share.items()}
        if writer is not None:
            for k, v in acc.items():
                writer.write(f"layers.{i}.{k}", (v / count[:, None]).cpu())
            writer.write(f"layers.{i}.hidden", torch.cat([samples[b][0] for b in range(len(batches))]))
            writer.write(f"layers.{i}.abs_act", torch.cat([samples[b][1] for b in range(len(batches))]))
    if opts.taylor:
        for i, score in enumerate(_taylor_scores(source, tokens, [batches[b] for b in mine], dev, world)):
            if writer is not None:
                writer.write(f"layers.{i}.taylor", score)
    if writer is None:
        return None
    writer.close()
    meta = StatsMeta(model=source.spec, corpus=corpus.source, domains=tokens.domains,
                     tokens=[int(tokens.blocks[d].numel()) for d in tokens.domains], num_layers=n_layers,
                     ffn_width=width, hidden_size=hidden_size, seq_len=tokens.seq_len, top_fraction=opts.top_fraction,
                     sample_tokens=n_samples, taylor=opts.taylor, seed=seed)
    return save_meta(out, meta)


def embed_blocks(reader: LazyCheckpoint, batches: list[torch.Tensor], device: torch.device, budget: int
                 ) -> Activations:
    """Each batch's input embeddings (fp32), on the device or spilled to disk above `budget` bytes; the embedding
    table itself is dropped afterwards. Rows are looked up in the checkpoint's dtype and then upcast (the same
    numbers), so a 7B bf16 table never exists in fp32 (0.5 GB)."""
    embed = reader.get("model.embed_tokens.weight").to(device)
    hidden = Activations([(*ids.shape, embed.shape[1]) for ids in batches], device, budget)
    for b, ids in enumerate(batches):
        hidden[b] = torch.nn.functional.embedding(ids.to(device), embed).float()
    return hidden


def spill_note(hidden: Activations) -> str:
    """For a progress bar's title: where the activations wait between layers, when that is the disk."""
    return f" (activations on disk: {hidden.nbytes / 2**30:.2f} GiB over budget)" if hidden.spilled else ""


def rotary_embeddings(skeleton, config, sample: torch.Tensor, seq_len: int):
    """(cos, sin) for positions 0..seq_len-1, from the model's own rotary class (built off the meta skeleton), on
    the sample's device."""
    positions = torch.arange(seq_len, device=sample.device)[None]
    rotary = type(skeleton.model.rotary_emb)(config=config).to(sample.device)
    return rotary(sample, positions), positions


def domain_batches(tokens: TokenBlocks, batch_size: int) -> list[tuple[int, torch.Tensor, int]]:
    """(domain index, ids [b, T], index of the first block within its domain); each batch holds one domain."""
    out = []
    for d, name in enumerate(tokens.domains):
        blocks = tokens.blocks[name]
        out += [(d, blocks[s:s + batch_size], s) for s in range(0, len(blocks), batch_size)]
    return out


def _sample_positions(tokens: TokenBlocks, batches, total: int, seed: int) -> list[torch.Tensor]:
    """Per batch, the flat token positions kept as samples: an equal, seeded share of each domain's tokens."""
    per_domain = max(1, total // len(tokens.domains))
    chosen = {}
    for d, name in enumerate(tokens.domains):
        n = tokens.blocks[name].numel()
        chosen[d] = np.sort(np.random.default_rng([seed, d]).permutation(n)[: min(per_domain, n)])
    picks = []
    for d, ids, start in batches:
        lo, hi = start * tokens.seq_len, (start + len(ids)) * tokens.seq_len
        mine = chosen[d][(chosen[d] >= lo) & (chosen[d] < hi)] - lo
        picks.append(torch.from_numpy(mine))
    return picks


def materialise_layer(module: torch.nn.Module, reader: LazyCheckpoint, prefix: str,
                      device: torch.device = torch.device("cpu")) -> None:
    # fp32 whatever the checkpoint stores (a bf16 skeleton would meet fp32 hidden states): the statistics and the
    # reconstruction's normal equations are sums over thousands of tokens. Each tensor is upcast by copying it into
    # its fp32 parameter, on the device: a GPU run never holds the layer in fp32 on the host (0.8 GB at 7B), and no
    # run holds a second fp32 copy of the layer beside the module's own (a state dict to load).
    release_freed()  # the previous layer's freed memory, handed back before this one is allocated
    module.to_empty(device=device).float()
    with torch.no_grad():
        for k, param in module.state_dict().items():
            stored = reader.get(prefix + k)
            if stored.shape != param.shape:  # copy_ would broadcast a wrong shape instead of failing
                raise MoefyError(f"{prefix + k} has shape {tuple(stored.shape)} in the checkpoint, but its config "
                                 f"makes it {tuple(param.shape)}")
            param.copy_(stored.to(device))
    module.eval()


def _taylor_scores(source: ModelSource, tokens: TokenBlocks, batches, device: torch.device, world: int = 1
                   ) -> list[torch.Tensor]:
    """LLaMA-MoE's importance: per domain, mean over tokens of |a_j · ∂L/∂a_j| (needs the full model and backward).
    `batches` are this process's; with world > 1 the sums are all-reduced."""
    model = load_causal_lm(source.directory).to(device)
    layers = model.model.layers
    D, width = len(tokens.domains), model.config.intermediate_size
    scores = [torch.zeros(D, width, dtype=torch.float64) for _ in layers]
    counts = torch.zeros(D, dtype=torch.float64)
    acts: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args):
            args[0].retain_grad()
            acts[i] = args[0]
        return hook

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    for d, ids, _ in progress(batches, "taylor scores"):
        model.zero_grad(set_to_none=True)
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for i, a in acts.items():
            scores[i][d] += (a * a.grad).abs().reshape(-1, width).sum(0).double().cpu()
        counts[d] += ids.numel()
    for h in hooks:
        h.remove()
    if world > 1:  # all_reduce on gloo/NCCL wants the tensors on the process group's device
        for s in (*scores, counts):
            s.copy_(_all_reduced(s, device))
    return [s / counts[:, None] for s in scores]


def _all_reduced(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    on = t.to(device)
    torch.distributed.all_reduce(on)
    return on.cpu()
