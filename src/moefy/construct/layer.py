"""What a construction method or router init may look at for one layer (its own module, so the registry and the
router inits can both import it without a circle)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from moefy.errors import MoefyError
from moefy.profile.stats import NeuronStats


@dataclass
class LayerInput:
    """What a method may look at for one layer. Weights and stats are read lazily and at most once."""

    layer: int
    width: int
    hidden: int  # the model's hidden size: a router's width, known without reading a weight
    _read: Callable[[str], torch.Tensor]
    _stats: Callable[[], NeuronStats] | None  # profiles on first call (cached)
    extra: dict = field(default_factory=dict)  # decisions made before the per-layer loop (dive's domain groups)
    _cache: dict = field(default_factory=dict)

    def weight(self, which: str) -> torch.Tensor:  # "gate" | "up" | "down", in float32
        if which not in self._cache:
            self._cache[which] = self.stored(which).float()
        return self._cache[which]

    def stored(self, which: str) -> torch.Tensor:
        """The weight in the checkpoint's own dtype (cluster multiplies a bf16 checkpoint's rows in bf16)."""
        if ("stored", which) not in self._cache:
            self._cache[("stored", which)] = self._read(which)
        return self._cache[("stored", which)]

    def stats(self, method: str) -> dict[str, torch.Tensor]:
        if self._stats is None:
            raise MoefyError(f"{method} needs calibration data: pass --calib CORPUS")
        if "stats" not in self._cache:
            stats = self._stats()
            self._cache["stats"] = {k: v.float() for k, v in stats.layer(self.layer).items()}
            self._cache["stats"]["sample_domain"] = stats.sample_domain()
            self._cache["stats"]["domain_tokens"] = torch.tensor(stats.meta.tokens, dtype=torch.float32)
        return self._cache["stats"]
