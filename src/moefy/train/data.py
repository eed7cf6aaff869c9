"""Training data: one packed stream of fixed-length blocks per domain (documents joined with EOS), and a sampler
that draws each sequence's domain by weight. Its whole state (stream positions, weights, RNG) is plain JSON, saved
in every checkpoint, so a resumed run continues the same sequence."""

from __future__ import annotations

import numpy as np
import torch

from moefy.data.corpus import Corpus
from moefy.data.tokens import token_blocks


class DomainSampler:
    def __init__(self, corpus: Corpus, tokenizer, seq_len: int, weights: dict[str, float], seed: int):
        self.streams = token_blocks(corpus, tokenizer, seq_len, None, seed).blocks
        self.domains = sorted(self.streams)
        self.weights = {d: float(weights[d]) for d in self.domains}
        self.position = {d: 0 for d in self.domains}
        self.epochs = {d: 0 for d in self.domains}  # times a domain ran out and was cycled (logged, never fatal)
        self.rng = np.random.default_rng(seed)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        p = np.array([self.weights[d] for d in self.domains])
        picks = self.rng.choice(len(self.domains), size=batch_size, p=p / p.sum())
        rows, names = [], []
        for i in picks:
            d = self.domains[i]
            blocks = self.streams[d]
            if self.position[d] >= len(blocks):
                self.position[d] = 0
                self.epochs[d] += 1
            rows.append(blocks[self.position[d]])
            names.append(d)
            self.position[d] += 1
        return torch.stack(rows), names

    def state(self) -> dict:
        return {"weights": self.weights, "position": self.position, "epochs": self.epochs,
                "rng": self.rng.bit_generator.state}

    def load_state(self, state: dict) -> None:
        self.weights, self.position, self.epochs = dict(state["weights"]), dict(state["position"]), dict(state["epochs"])
        self.rng.bit_generator.state = state["rng"]
