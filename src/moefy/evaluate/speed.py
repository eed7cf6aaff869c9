"""Speed of a model against its dense source, measured in the same run: forward tokens/s, generation tokens/s,
active parameters per token and the ideal FLOP ratio. Timings are medians of interleaved repeats."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Speed:
    forward_tokens_per_s: float
    generate_tokens_per_s: float
    active_params: int  # per token, embeddings excluded
    total_params: int  # embeddings excluded

    def to_dict(self) -> dict:
        return asdict(self)


def matmul_params(model) -> tuple[int, int]:
    """(active per token, total) parameters of the decoder layers: what a token's matmuls touch."""
    if hasattr(model, "matmul_params"):  # a GGUF in llama.cpp reads them from its own tensor table
        return model.matmul_params()
    total = active = 0
    for layer in model.model.layers:
        n = sum(p.numel() for p in layer.parameters())
        total += n
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = sum(p.numel() for p in experts.parameters()) / experts.num_experts
            unused = experts.num_experts - layer.mlp.gate.top_k
            n -= int(unused * per_expert)
        active += n
    return active, total


def _sync(model) -> None:
    """CUDA kernels return before they finish: without a sync a GPU forward would be timed at its launch cost."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(models: dict[str, object], input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> dict[str, Speed]:
    """Interleave the models' timings so machine noise hits them alike."""
    fwd = {name: [] for name in models}
    gen = {name: [] for name in models}
    prompt = input_ids[:1, :32]
    for _ in range(repeats):
        for name, model in models.items():
            _sync(model)
            t0 = time.perf_counter()
            model(input_ids=input_ids)
            _sync(model)
            fwd[name].append(input_ids.numel() / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            _sync(model)
            gen[name].append(new_tokens / (time.perf_counter() - t0))
    out = {}
    for name, model in models.items():
        active, total = matmul_params(model)
        out[name] = Speed(statistics.median(fwd[name]), statistics.median(gen[name]), active, total)
    return out
