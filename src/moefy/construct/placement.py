"""Which decoder layers become MoE: all (LLaMA-MoE), every other, the last n, or an explicit list."""

from __future__ import annotations

from moefy.errors import MoefyError


def moe_layers(placement: str | list[int], num_layers: int) -> list[int]:
    if isinstance(placement, list):
        bad = [i for i in placement if not 0 <= i < num_layers]
        if bad or not placement:
            raise MoefyError(f"layers {bad or placement} are not valid MoE layers of a {num_layers}-layer model")
        return sorted(set(placement))
    if placement == "all":
        return list(range(num_layers))
    if placement == "every_other":  # odd layers, as decoder_sparse_step=2 would choose
        return list(range(1, num_layers, 2))
    if placement.startswith("last:") and placement[5:].isdigit() and 0 < int(placement[5:]) <= num_layers:
        return list(range(num_layers - int(placement[5:]), num_layers))
    raise MoefyError(f"unknown layer placement {placement!r}: use all, every_other, last:N (1..{num_layers}) "
                     "or a list of layer indices")
