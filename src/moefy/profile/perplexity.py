"""Held-out perplexity per domain with sliding windows at a stated context length.

Each domain's documents are joined with EOS into one token stream. Windows of `seq_len` tokens start every `stride`
tokens (1 <= stride < seq_len); each window scores only the tokens the previous one did not reach, so every token
after the first is scored exactly once, with at least seq_len - stride tokens of context. The default stride,
seq_len - 1, is the cheapest setting that still scores every token (plain non-overlapping blocks would skip the first
token of each block)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moefy.data.corpus import Corpus
from moefy.data.tokens import stream
from moefy.errors import MoefyError
from moefy.host_memory import reuse_freed_blocks
from moefy.progress import progress


@dataclass(frozen=True)
class Perplexity:
    per_domain: dict[str, float]  # mean next-token loss (nats)
    tokens: dict[str, int]  # scored tokens per domain
    seq_len: int
    stride: int

    @property
    def overall_loss(self) -> float:
        """Token-weighted mean loss over all domains."""
        total = sum(self.tokens.values())
        return sum(self.per_domain[d] * self.tokens[d] for d in self.per_domain) / total

    def ppl(self, domain: str | None = None) -> float:
        loss = self.overall_loss if domain is None else self.per_domain[domain]
        return math.exp(min(loss, 700.0))

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "stride": self.stride, "tokens": self.tokens, "loss": self.per_domain,
                "ppl": {d: self.ppl(d) for d in self.per_domain}, "overall_ppl": self.ppl()}


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position within the window) for a stream of n_tokens; position p predicts token p."""
    out, start, reached = [], 0, 0
    while True:
        end = min(start + seq_len, n_tokens)
        out.append((start, end, reached - start if start else 0))
        if end == n_tokens:
            return out
        reached, start = end, start + stride


def same_width_batches(spans: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows in batches of up to batch_size, a new batch wherever the width changes: the stream's last
    window is usually short, and padding it to the full context would pay for positions nobody scores (with 512
    tokens per domain and a context of 256, DIVE's cross-domain loss: 3 windows, 768 positions for 512 tokens)."""
    out: list[list[tuple[int, int, int]]] = []
    for span in spans:
        last = out[-1] if out else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == span[1] - span[0]:
            last.append(span)
        else:
            out.append([span])
    return out


@torch.no_grad()
@reuse_freed_blocks()  # a model read as float32 (models.load_in_float32) upcasts its weights in every batch
def heldout_perplexity(model, tokenizer, corpus: Corpus, seq_len: int = 256, tokens_per_domain: int | None = 4096,
                       stride: int | None = None, batch_size: int = 8) -> Perplexity:
    stride = stride or seq_len - 1
    if not 0 < stride < seq_len:
        raise MoefyError(f"stride must be between 1 and the context length minus one, {seq_len - 1} (got {stride})")
    losses, counts = {}, {}
    for domain, texts in corpus.by_domain().items():
        ids = stream(texts, tokenizer, tokens_per_domain)
        if len(ids) < seq_len + 1:
            raise MoefyError(f"domain {domain!r} has {len(ids)} held-out tokens, fewer than the context length "
                             f"{seq_len} + 1")
        spans = windows(len(ids), seq_len, stride)
        targets = ids.to(model.device)  # scored where the logits are: no vocabulary-wide copy back to the CPU
        nll, scored = 0.0, 0
        for chunk in progress(same_width_batches(spans, batch_size), f"perplexity {domain}"):
            batch = torch.stack([ids[s:e] for s, e, _ in chunk])
            logits = model(input_ids=batch.to(model.device)).logits
            for row, (s, e, first) in enumerate(chunk):
                # Position j predicts token s+1+j; a later window scores only tokens from s+first on. One row at a
                # time in fp32: the batch's logits stay in the model's dtype, and no batch-wide fp32 copy or
                # log-softmax exists (an 8B model with a 128k vocabulary, 8 × 2,048 tokens: 8.4 GB each).
                lo = first - 1 if first else 0
                nll += torch.nn.functional.cross_entropy(logits[row, lo:e - s - 1].float(), targets[s + 1 + lo:e],
                                                         reduction="sum").item()
                scored += e - s - 1 - lo
            del logits  # else this batch's logits would live on through the next batch's forward
        losses[domain], counts[domain] = nll / scored, scored
    return Perplexity(losses, counts, seq_len, stride)
