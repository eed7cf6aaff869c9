"""Frozen weights kept in the MoE's own dtype while the rest trains in float32 (the recipe's `frozen_dtype: source`).

A bf16 7B MoE loaded in float32 is 27 GB before anything trains; with its frozen weights kept bf16 it is 13.5 GB.
Each frozen weight stays stored in its dtype and is upcast to float32 where a layer reads it, so every matmul is the
float32 one: bf16 → float32 is exact, and losses and trained weights are those of the float32-loaded model. The
upcast copies live only while their layer runs: gradient checkpointing makes backward recompute them instead of
keeping them, which is why the recipe requires it. What trains is a float32 parameter, as in a float32 run.

Two ways to upcast, because of peft:
- a torch parametrization, for every frozen weight a layer reads directly;
- for the fused expert tensors that peft's LoRA wraps (`target_parameters`), the wrapper's forward swaps them to
  float32 and back. peft applies LoRA there through a parametrization of its own, registered for each forward; a
  chain behind ours would neither be removed nor be seen by the expert kernel (peft 0.21.2: its cleanup looks for
  one proxy class only, and its parametrize cache keeps the value from before LoRA). Swapping the tensor's data is
  safe there because the expert kernel reads peft's W + BA, a new tensor, never the swapped one. Backward's
  recomputation must run each layer to its end (the loop turns checkpointing's early stop off), or the swap back
  would be skipped."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.utils import parametrize

from moefy.models import UpcastOnRead, inference_dtype, load_causal_lm, read_as_float32


class _Swap:
    """Forward hooks of one outermost peft wrapper: the tensors it wraps are float32 while it runs."""

    def __init__(self, tensors: list[tuple[torch.nn.Module, str]]):
        self.tensors = tensors
        self.stored: list[torch.Tensor] = []

    def before(self, _module, _args) -> None:
        for owner, name in self.tensors:
            param = owner._parameters[name]
            self.stored.append(param.data)
            param.data = param.data.float()

    def after(self, _module, _args, _output) -> None:
        for (owner, name), data in zip(self.tensors, self.stored, strict=True):
            owner._parameters[name].data = data
        self.stored = []


def _lora_wrapped(model) -> dict:
    """{outermost peft ParamWrapper: [(module, tensor name), ...]}: the tensors peft's LoRA wraps as parameters
    (one wrapper per tensor, nested where a module has two)."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(m.base_layer) for m in wrappers if isinstance(m.base_layer, ParamWrapper)}
    wrapped = {}
    for outer in (m for m in wrappers if id(m) not in inner):
        layer, tensors = outer, []
        while isinstance(layer, ParamWrapper):
            tensors.append((layer.get_base_layer(), layer.parameter_name))
            layer = layer.base_layer
        wrapped[outer] = tensors
    return wrapped


def keep_stored(model) -> list:
    """Parameters that train (requires_grad) become float32; every other non-float32 weight keeps its dtype and
    is read as float32. Returns the hook handles that release() removes."""
    wrapped = _lora_wrapped(model)
    swapped = {(id(owner), name) for tensors in wrapped.values() for owner, name in tensors}
    read_as_float32(model, writable=lambda name, param: param.requires_grad,
                    leave=lambda owner, name: (id(owner), name) in swapped)
    handles = []
    for wrapper, tensors in wrapped.items():
        swap = _Swap(tensors)
        handles += [wrapper.register_forward_pre_hook(swap.before), wrapper.register_forward_hook(swap.after)]
    return handles


def load_frozen(directory: Path, device: torch.device, frozen_dtype: str):
    """A model that only runs without grad (the distillation teacher, the dynamic mixture's reference), in
    `inference_dtype`. With `frozen_dtype: source` where that is float32 (the CPU), its weights stay in their stored
    dtype and are read as float32: the float32 model's logits, from a bf16 checkpoint in half the memory."""
    dtype = inference_dtype(device)
    keep = frozen_dtype == "source" and dtype == torch.float32
    model = load_causal_lm(directory, None if keep else dtype).to(device).requires_grad_(False)
    if keep:
        read_as_float32(model)
    return model


def release(model, handles: list) -> None:
    """Undo keep_stored: frozen weights are plain parameters in their stored dtype again, as LoRA merging, the next
    stage and the export expect."""
    for handle in handles:
        handle.remove()
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name, chain in list(module.parametrizations.items()):
                if all(isinstance(p, UpcastOnRead) for p in chain):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
