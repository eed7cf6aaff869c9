"""Architecture facts as data: which dense families we can split, where their FFN lives,
and what a family's config may contain that the MoE output classes cannot hold exactly."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from moefy.errors import MoefyError


@dataclass(frozen=True)
class Refusal:
    """A config value (or tensor name pattern) that the MoE classes cannot represent exactly."""

    reason: str
    config_key: str | None = None
    is_bad: Callable[[Any], bool] = bool
    tensor_pattern: str | None = None


@dataclass(frozen=True)
class Family:
    model_type: str
    layer_prefix: str = "model.layers.{layer}."
    gate: str = "mlp.gate_proj.weight"
    up: str = "mlp.up_proj.weight"
    down: str = "mlp.down_proj.weight"
    # Output formats able to hold this family's attention exactly, in order of preference.
    formats: tuple[str, ...] = ("mixtral", "qwen2_moe")
    refusals: tuple[Refusal, ...] = field(default_factory=tuple)

    def ffn_key(self, layer: int, which: str) -> str:
        return self.layer_prefix.format(layer=layer) + getattr(self, which)

    def is_ffn_key(self, name: str) -> bool:
        suffixes = (self.gate, self.up, self.down)
        return name.startswith("model.layers.") and name.endswith(suffixes)

    def check(self, config: dict[str, Any], tensor_names: list[str]) -> None:
        for key in REQUIRED_CONFIG:
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MoefyError(f"the config's {key} must be a positive integer (found {value!r})")
        layers = {int(m.group(1)) for n in tensor_names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
        if layers and max(layers) + 1 != config["num_hidden_layers"]:
            raise MoefyError(f"the config says {config['num_hidden_layers']} layers but the weights hold "
                             f"{max(layers) + 1}: config and weights do not belong together")
        for r in self.refusals:
            if r.config_key is not None and r.is_bad(config.get(r.config_key)):
                raise MoefyError(f"cannot convert this {self.model_type} checkpoint exactly: {r.reason}")
            if r.tensor_pattern is not None and any(re.search(r.tensor_pattern, n) for n in tensor_names):
                raise MoefyError(f"cannot convert this {self.model_type} checkpoint exactly: {r.reason}")


# Config fields every stage reads; checked before any work so a damaged config is one line, not a KeyError.
REQUIRED_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

# Mixtral's and Qwen2-MoE's attention is LLaMA's (Qwen2's q/k/v biases are written as zeros), and experts are SwiGLU.
_LLAMA_REFUSALS = (
    Refusal("q/k/v/o projections have biases (attention_bias=true), which Mixtral cannot hold", "attention_bias"),
    Refusal("the FFN has biases (mlp_bias=true), which Mixtral experts cannot hold", "mlp_bias"),
    Refusal("the FFN activation is not SiLU (SwiGLU), which Mixtral experts require", "hidden_act",
            lambda v: v not in (None, "silu")),
    Refusal("the attention has QK-norm weights, which Mixtral cannot hold", tensor_pattern=r"\.(q_norm|k_norm)\."),
)

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", refusals=_LLAMA_REFUSALS),
    "mistral": Family("mistral", refusals=_LLAMA_REFUSALS),
}


def family_for(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise MoefyError(f"architecture {model_type!r} is not supported yet; supported: {supported}")
    return FAMILIES[model_type]
