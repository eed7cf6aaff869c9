"""Router initialisations that need no calibration data."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from moefy.recipes import RouterInit

RouterInitFn = Callable[[RouterInit, int, int, np.random.Generator], torch.Tensor]


def _random(opts: RouterInit, experts: int, hidden: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((experts, hidden)) * opts.std).to(torch.float32)


def _zero(opts: RouterInit, experts: int, hidden: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.zeros(experts, hidden)


ROUTER_INITS: dict[str, RouterInitFn] = {"random": _random, "zero": _zero}
