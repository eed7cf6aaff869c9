"""Speed of a model against its dense source, measured in the same run: prompt tokens/s (scored, with every
position's logits, and prefilled, with the last position's only), generation tokens/s, active parameters per token
and the ideal FLOP ratio. Timings are medians of interleaved repeats, optionally of the models compiled with
torch.compile."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from functools import partial

import torch

from moefy.errors import MoefyError


@dataclass(frozen=True)
class Speed:
    forward_tokens_per_s: float  # the prompt scored: logits at every position, as perplexity needs
    # the prompt prefilled: logits at the last position only, as generation's first step and llama.cpp's own prompt
    # benchmark (llama-bench) compute them. The LM head then runs once per sequence instead of once per token; it
    # costs the MoE and dense the same, so this is the prompt rate whose MoE ÷ dense ratio the FFN moves most.
    prefill_tokens_per_s: float
    generate_tokens_per_s: float
    active_params: int  # per token, embeddings excluded
    total_params: int  # embeddings excluded
    compile_s: float | None = None  # seconds of the untimed first passes that compiled it (compiled)

    def to_dict(self) -> dict:
        return asdict(self)


# Speed's rates, each `{rate}_tokens_per_s`
RATES = ("forward", "prefill", "generate")


def ratios(mine: Speed, base: Speed) -> dict[str, float]:
    """Each of mine's rates ÷ base's (two models measured in the same run)."""
    return {r: getattr(mine, f"{r}_tokens_per_s") / getattr(base, f"{r}_tokens_per_s") for r in RATES}


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


def _rate(model, tokens: int, run: Callable[[], object]) -> float:
    """tokens / the seconds run() takes, the model's device idle before and after."""
    _sync(model)
    t0 = time.perf_counter()
    run()
    _sync(model)
    return tokens / (time.perf_counter() - t0)


@contextmanager
def _compiled(model, backend: str | Callable):
    """The model with its forward compiled (shapes static), undone on exit so that later passes (oracle hooks) see
    the plain model. Generation then runs on a static KV cache, whose fixed shapes let one compiled decode step
    serve every token: transformers' own compiled decoding, which it turns on by itself only on GPUs."""
    own = vars(model).get("forward")  # a forward the caller set on the instance (their own compiled one, say)
    model.forward = torch.compile(model.forward, backend=backend, dynamic=False)
    try:
        yield
    finally:
        if own is None:
            del model.forward  # the class's forward shows through again
        else:
            model.forward = own


@torch.no_grad()
def measure(models: dict[str, object], input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3,
            compile_backend: str | Callable | None = None) -> dict[str, Speed]:
    """Interleave the models' timings so machine noise hits them alike. compile_backend (torch.compile's, e.g.
    "inductor"): time every torch model compiled, each after one untimed forward, prefill and generation that compile
    it; a llama.cpp model is timed as it is. Compiling clears torch.compile's caches before and after
    (torch._dynamo.reset)."""
    fwd = {name: [] for name in models}
    pre = {name: [] for name in models}
    gen = {name: [] for name in models}
    prompt = input_ids[:1, :32]
    compiled = {name for name, model in models.items() if compile_backend and isinstance(model, torch.nn.Module)}

    def generate(name: str) -> None:
        static = {"cache_implementation": "static"} if name in compiled else {}
        models[name].generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              **static)

    compile_s = {}
    with ExitStack() as stack:
        if compiled:
            # every model's forward passes through code that transformers' decorators share, and dynamo counts the
            # compiled variants of a code object over the whole process: four variants (the forward, the prefill, the
            # prompt, the decode step) per model would pass its default limit of 8 and leave the later models
            # uncompiled, so the limit fits the models, and the count starts from none (and its entries go) with
            # this measurement
            torch._dynamo.reset()
            stack.callback(torch._dynamo.reset)
            stack.enter_context(torch._dynamo.config.patch(recompile_limit=max(8, 5 * len(compiled))))
        for name in compiled:
            stack.enter_context(_compiled(models[name], compile_backend))
            t0 = time.perf_counter()
            try:
                models[name](input_ids=input_ids)
                models[name](input_ids=input_ids, logits_to_keep=1)
                generate(name)
            except Exception as e:  # inductor needs a C++ compiler; its errors run to pages, wrapped in dynamo's
                root = e
                while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
                    root = inner
                first = (str(root).strip().splitlines() or [""])[0]
                raise MoefyError(f"torch.compile failed on {name}: {type(root).__name__}: {first}; time it without "
                                 "compiling") from e
            compile_s[name] = time.perf_counter() - t0
        for _ in range(repeats):
            for name, model in models.items():
                fwd[name].append(_rate(model, input_ids.numel(), partial(model, input_ids=input_ids)))
                pre[name].append(_rate(model, input_ids.numel(), partial(model, input_ids=input_ids, logits_to_keep=1)))
                gen[name].append(_rate(model, new_tokens, partial(generate, name)))
    out = {}
    for name, model in models.items():
        active, total = matmul_params(model)
        out[name] = Speed(statistics.median(fwd[name]), statistics.median(pre[name]), statistics.median(gen[name]),
                          active, total, compile_s.get(name))
    return out
