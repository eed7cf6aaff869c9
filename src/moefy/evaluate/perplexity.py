"""Held-out perplexity per domain: each domain's documents joined with EOS, cut into non-overlapping blocks of
`seq_len` tokens (the stated context length), every next-token loss counted once."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moefy.data.corpus import Corpus
from moefy.data.tokens import token_blocks
from moefy.progress import progress


@dataclass(frozen=True)
class Perplexity:
    per_domain: dict[str, float]  # mean next-token loss (nats)
    tokens: dict[str, int]
    seq_len: int

    @property
    def overall_loss(self) -> float:
        """Token-weighted mean loss over all domains."""
        total = sum(self.tokens.values())
        return sum(self.per_domain[d] * self.tokens[d] for d in self.per_domain) / total

    def ppl(self, domain: str | None = None) -> float:
        loss = self.overall_loss if domain is None else self.per_domain[domain]
        return math.exp(min(loss, 700.0))


@torch.no_grad()
def heldout_perplexity(model, tokenizer, corpus: Corpus, seq_len: int = 256, tokens_per_domain: int | None = 4096,
                       batch_size: int = 8, seed: int = 0) -> Perplexity:
    blocks = token_blocks(corpus, tokenizer, seq_len, tokens_per_domain, seed)
    losses, counts = {}, {}
    work = [(d, blocks.blocks[d][s:s + batch_size]) for d in blocks.domains
            for s in range(0, len(blocks.blocks[d]), batch_size)]
    sums = {d: 0.0 for d in blocks.domains}
    for d, ids in progress(work, "held-out perplexity"):
        logits = model(input_ids=ids).logits.float()
        sums[d] += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum").item()
    for d in blocks.domains:
        counts[d] = blocks.blocks[d].shape[0] * (seq_len - 1)
        losses[d] = sums[d] / counts[d]
    return Perplexity(losses, counts, seq_len)
