"""Which parameters train, by name. Patterns are data, so a new family only adds names here."""

from __future__ import annotations

import re

from moefy.errors import MoefyError

_ROUTER = r"\.mlp\.gate\.weight$"
_NORM = r"norm\.weight$"
_EXPERTS = r"\.mlp\.(experts|shared_expert)\.|\.mlp\.shared_expert_gate\."
_LORA = r"\.lora_[AB]\."  # adapters that moefy.train.lora attached
TRAINABLE_SETS: dict[str, tuple[str, ...]] = {
    "norm": (_NORM,),
    "router": (_ROUTER,),
    "router+norm": (_ROUTER, _NORM),
    "experts-lora": (_ROUTER, _NORM, _LORA),
    "experts": (_ROUTER, _NORM, _EXPERTS),
    "all": (r".",),
}


def matching_names(names: list[str], name: str) -> list[str]:
    """The names, of those given, in trainable set `name`."""
    patterns = [re.compile(p) for p in TRAINABLE_SETS[name]]
    return [n for n in names if any(p.search(n) for p in patterns)]


def matching(model, name: str) -> list[str]:
    """Names of the model's parameters in trainable set `name`."""
    return matching_names([n for n, _ in model.named_parameters()], name)


def select_trainable(model, name: str) -> list:
    """Make exactly set `name` trainable; returns its (name, parameter) pairs."""
    names = set(matching(model, name))
    chosen = []
    for pname, param in model.named_parameters():
        param.requires_grad_(pname in names)
        if param.requires_grad:
            chosen.append((pname, param))
    if not chosen:
        raise MoefyError(f"trainable set {name!r} matches no parameter of this model (is it an MoE?)")
    return chosen
