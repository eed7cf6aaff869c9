"""Tokenise a corpus into fixed-length blocks per domain: documents joined with EOS, packed, then a seeded sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moefy.data.corpus import Corpus
from moefy.errors import MoefyError


@dataclass(frozen=True)
class TokenBlocks:
    domains: list[str]
    blocks: dict[str, torch.Tensor]  # domain -> int64 [n_blocks, seq_len]

    @property
    def seq_len(self) -> int:
        return next(iter(self.blocks.values())).shape[1]

    def tokens(self) -> int:
        return sum(b.numel() for b in self.blocks.values())


def stream(texts: list[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """All documents joined with EOS into one 1-D token stream (optionally cut to max_tokens)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MoefyError("the tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """The token stream cut into [n, seq_len] blocks (the ragged tail is dropped)."""
    ids = stream(texts, tokenizer)
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def token_blocks(corpus: Corpus, tokenizer, seq_len: int, tokens_per_domain: int | None, seed: int) -> TokenBlocks:
    """Up to tokens_per_domain tokens per domain (None = all), as whole seq_len blocks chosen with `seed`."""
    blocks = {}
    for i, (domain, texts) in enumerate(corpus.by_domain().items()):
        packed = pack(texts, tokenizer, seq_len)
        if len(packed) == 0:
            raise MoefyError(f"domain {domain!r} has too little text: fewer than {seq_len} tokens "
                             "(lower --seq-len or add text)")
        if tokens_per_domain is not None:
            want = max(1, tokens_per_domain // seq_len)
            if want < len(packed):
                order = np.random.default_rng([seed, i]).permutation(len(packed))[:want]
                packed = packed[np.sort(order)]
        blocks[domain] = packed
    return TokenBlocks(sorted(blocks), blocks)
