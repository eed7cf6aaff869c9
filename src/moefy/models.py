"""Loading models and tokenizers with stock transformers: the one place that does it, on the ground floor, so every
stage gets the same refusals (pickle weights, remote code) and the same one-line errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from moefy.errors import MoefyError
from moefy.sources import check_hf_dir, read_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_device(name: str = "auto") -> torch.device:
    """Where a layer-by-layer pass (profiling, reconstruction) computes: "auto" takes the GPU when one is present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoefyError(f"device {name!r} asked for, but torch sees no CUDA GPU here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MoefyError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def free_memory(device: torch.device) -> int:
    """Bytes free now: on a GPU, its free memory; on the CPU, what Linux calls available (free plus reclaimable
    cache), else the free physical pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype a frozen model runs in without grad: bf16 where the hardware computes it natively (a GPU), so a
    7B model loads in half the memory; fp32 on CPU, where bf16 matmuls are slower than fp32."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def stored_dtype(config: dict) -> torch.dtype:
    """The dtype a checkpoint's config.json says its weights are stored in ("dtype" since transformers 5,
    "torch_dtype" before); float32 when it names none."""
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)


def load_causal_lm(directory: Path, dtype: torch.dtype | None = torch.float32):
    """A local HF directory as a causal LM in eval mode, in `dtype` (None: as stored). Safetensors weights only, never
    remote code."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    check_hf_dir(Path(directory))  # before transformers, which would torch.load a pickle-only checkpoint
    logging.disable_progress_bar()  # one bar per load is noise next to moefy's own output
    # Asked for float32 from a bf16/fp16 checkpoint, transformers held each stored tensor beside its float32 copy
    # to the end of the load, and glibc kept the difference. Loaded as stored, then upcast one tensor at a time
    # (Module.float), the peak is the model (docs/benchmarks.md, "Training memory": the float32 rows). Exact: every
    # value of the narrower type is a float32.
    stored = stored_dtype(read_config(Path(directory)))
    dtype = stored if dtype is None else dtype
    upcast = dtype == torch.float32 and stored in (torch.bfloat16, torch.float16)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=stored if upcast else dtype,
                                                     trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoefyError(f"could not load {directory} with transformers: {first}") from exc
    if upcast:
        model.float()
        model.config.dtype = dtype
    return model.eval()


class UpcastOnRead(torch.nn.Module):
    """A parametrization: the weight stays stored in its dtype and is read as float32 (exact from bf16 or fp16)."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


def read_as_float32(model, writable: Callable[[str, torch.nn.Parameter], bool] = lambda name, param: False,
                    leave: Callable[[torch.nn.Module, str], bool] = lambda owner, name: False) -> None:
    """Every weight stored narrower than float32 keeps its dtype and is read as float32 where a layer uses it, so
    the model computes the float32 model's outputs in the memory of the stored one. The upcast copies live only
    while their layer runs. Weights that `writable` picks become float32 parameters instead, because a write into
    a parametrized weight lands in a temporary copy and is lost; those that `leave` picks are not touched."""
    # remove_duplicate=False: a tied lm_head is its own module's attribute and needs its own upcast.
    for qualified, param in list(model.named_parameters(remove_duplicate=False)):
        module_name, _, name = qualified.rpartition(".")
        owner = model.get_submodule(module_name)
        if writable(qualified, param):
            param.data = param.data.float()
        elif param.is_floating_point() and param.dtype != torch.float32 and not leave(owner, name):
            parametrize.register_parametrization(owner, name, UpcastOnRead(), unsafe=True)


def load_in_float32(directory: Path, dtype: torch.dtype | None = None,
                    writable: Callable[[str, torch.nn.Parameter], bool] = lambda name, param: False):
    """A no-grad model that computes in float32 from its weights at `dtype` (None: as stored), for the CPU passes
    that only read a model (verify, eval). Upcast once when the float32 model takes at most half of the memory
    free once loaded: the fastest. Else kept in `dtype` and read as float32 (read_as_float32, with `writable`),
    which fits a 7B model on a 24 GB machine but upcasts again in every forward (eval of a 1.1B pair at context 128
    took ~1.1× as long, with the freed copies reused: docs/benchmarks.md, "Eval and verify memory"). The logits are
    the same either way."""
    model = load_causal_lm(directory, dtype).requires_grad_(False)
    if 4 * sum(p.numel() for p in model.parameters()) <= free_memory(torch.device("cpu")) // 2:
        return model.float()
    read_as_float32(model, writable)
    return model


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoefyError(f"{directory} has no usable tokenizer: {first}") from exc
