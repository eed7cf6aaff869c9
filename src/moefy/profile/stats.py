"""NeuronStats: what the profiler measured, per layer and per domain, for every FFN neuron (a_j = silu(g_j·x)·(u_j·x)).

Per layer i (D domains, I neurons, S sampled tokens, H hidden):
  abs_mean, mean, sq_mean, gate_freq, top_freq   [D, I]   float64 running means
  taylor                                         [D, I]   mean |a_j·∂L/∂a_j| (only with taylor=True)
  hidden                                         [S, H]   MLP-input hidden states of the sampled tokens (fp16)
  abs_act                                        [S, I]   |a| of the same sampled tokens (fp16)
plus sample_domain [S] (the domain index of each sampled token) and tokens [D]."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError, safe_open

from moefy.errors import MoefyError
from moefy.tensor_writer import ShardedWriter, TensorSpec

STATS_JSON = "stats.json"
STATS_FILE = "stats.safetensors"


class StatsMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    corpus: str
    domains: list[str]
    tokens: list[int]  # per domain
    num_layers: int
    ffn_width: int
    hidden_size: int
    seq_len: int
    top_fraction: float
    sample_tokens: int
    taylor: bool
    seed: int


@dataclass(frozen=True)
class NeuronStats:
    directory: Path
    meta: StatsMeta

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """One layer's tensors (loaded on demand: the samples of all layers together can be large)."""
        with safe_open(str(self.directory / STATS_FILE), "pt") as fh:
            prefix = f"layers.{i}."
            return {k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}

    def sample_domain(self) -> torch.Tensor:
        with safe_open(str(self.directory / STATS_FILE), "pt") as fh:
            return fh.get_tensor("sample_domain")


def stats_writer(directory: Path, specs: list[TensorSpec]) -> ShardedWriter:
    """The stats file, written tensor by tensor as the profiler finishes each layer (a 7B model's samples are
    ~2 GB: they never sit in memory all at once)."""
    directory.mkdir(parents=True, exist_ok=True)
    return ShardedWriter(directory, specs, max_bytes=2**62, stem=STATS_FILE.removesuffix(".safetensors"),
                         metadata={"format": "moefy-stats"})


def save_meta(directory: Path, meta: StatsMeta) -> NeuronStats:
    """The stats' description, written last: a directory without it holds no finished profile."""
    (directory / STATS_JSON).write_text(meta.model_dump_json(indent=2))
    return NeuronStats(directory, meta)


def load_stats(directory: Path) -> NeuronStats:
    directory = Path(directory)
    if not (directory / STATS_JSON).is_file() or not (directory / STATS_FILE).is_file():
        raise MoefyError(f"{directory} holds no profile (expected {STATS_JSON} and {STATS_FILE})")
    try:
        meta = StatsMeta.model_validate(json.loads((directory / STATS_JSON).read_text()))
        with safe_open(str(directory / STATS_FILE), "pt"):
            pass
    except (ValueError, SafetensorError, OSError) as exc:
        raise MoefyError(f"corrupt profile in {directory}: {str(exc).splitlines()[0]}") from exc
    return NeuronStats(directory, meta)
