"""Seeds derived from the recipe's seed, one per purpose (a layer's fit, a copy's re-initialisation, one training
step on one process), so that independent random streams share no draws and none depends on what ran before it."""

from __future__ import annotations

import numpy as np


def derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
