"""LoRA on the expert projections through peft, for the `experts-lora` trainable set.

transformers 5 stores each layer's experts as fused 3-D parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]),
so they are targeted with peft's `target_parameters` (one low-rank delta per expert). A Qwen2-MoE shared expert
is a plain MLP and is targeted as modules. peft injects its wrappers into the model in place, so the model keeps
being called directly; `merge` folds the deltas into the weights and restores the stock module tree for export."""

from __future__ import annotations

import re
import warnings

from moefy.train.recipe import Lora

EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
SHARED_EXPERT_MODULES = r".*\.mlp\.shared_expert\.(gate_proj|up_proj|down_proj)"
LORA_PARAMETER = re.compile(r"\.lora_[AB]\.")
PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original$")  # torch's spelling (train/frozen.py's upcasts)


def add_lora(model, options: Lora):
    """Wrap `model`'s experts with fresh LoRA adapters (B = 0, so the function is unchanged); returns the peft
    wrapper, which `merge` needs."""
    from peft import LoraConfig, get_peft_model

    has_shared = any(re.fullmatch(SHARED_EXPERT_MODULES, name) for name, _ in model.named_modules())
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=SHARED_EXPERT_MODULES if has_shared else [],
                        target_parameters=list(EXPERT_PARAMETERS))
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; nothing for the user to do
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def merge(peft_model):
    """Fold the adapters into the expert weights; returns the stock model. Each sum is taken in float32 and rounded
    once to the weight's dtype (peft would round the delta to a bf16 weight's dtype first), so a weight kept in
    bf16 (train/frozen.py) merges to what a float32 run writes out."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            name = module.parameter_name if isinstance(module, ParamWrapper) else "weight"
            weight = getattr(module.get_base_layer(), name)
            stored = weight.dtype
            weight.data = weight.data.float()
            module.merge()
            weight.data = weight.data.to(stored)
    return peft_model.unload()


def stable_name(name: str) -> str:
    """A parameter's name as the unwrapped model spells it, so checkpoints of merged weights load whether or not
    LoRA is attached or the weight is upcast. Adapter names keep peft's spelling: stripping theirs would collide."""
    return name if LORA_PARAMETER.search(name) else PARAMETRIZED.sub(r".\1", name.replace(".base_layer", ""))
