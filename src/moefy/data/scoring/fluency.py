"""Fluency: each document's per-token perplexity under a reference causal LM (its first `max_tokens` tokens).
Batched, with progress, and a resumable cache: one JSON line per scored document, keyed by the model and the
document's hash, appended as batches finish, so an interrupted run scores only what is left."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from moefy.progress import progress


def doc_key(model_id: str, max_tokens: int, text: str) -> str:
    return hashlib.sha256(f"{model_id}\x00{max_tokens}\x00{text}".encode()).hexdigest()


class FluencyScorer:
    def __init__(self, model, tokenizer, model_id: str, max_tokens: int, batch_size: int, cache: Path | None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.model_id, self.max_tokens, self.batch_size, self.cache = model_id, max_tokens, batch_size, cache

    def _cached(self) -> dict[str, float]:
        if self.cache is None or not self.cache.is_file():
            return {}
        out = {}
        for line in self.cache.read_text().splitlines():
            try:
                entry = json.loads(line)
                out[entry["key"]] = float(entry["ppl"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut off by a killed run: that document is scored again
        return out

    def score(self, texts: list[str]) -> list[float]:
        keys = [doc_key(self.model_id, self.max_tokens, t) for t in texts]
        known = self._cached()
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in known}.items())
        encoded = [(k, self.tokenizer(t, truncation=True, max_length=self.max_tokens).input_ids) for k, t in todo]
        encoded.sort(key=lambda kv: len(kv[1]))  # similar lengths per batch: less padding
        batches = [encoded[i:i + self.batch_size] for i in range(0, len(encoded), self.batch_size)]
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
        for batch in progress(batches, "fluency (perplexity)"):
            scores = self._batch([ids for _, ids in batch])
            lines = [json.dumps({"key": k, "ppl": s}) for (k, _), s in zip(batch, scores)]
            known.update({k: s for (k, _), s in zip(batch, scores)})
            if self.cache is not None:
                with open(self.cache, "a") as fh:
                    fh.write("\n".join(lines) + "\n")
        return [known[k] for k in keys]

    @torch.no_grad()
    def _batch(self, seqs: list[list[int]]) -> list[float]:
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: the real tokens never attend to it
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        valid = mask[:, 1:].float()
        per_doc = (nll * valid).sum(1) / valid.sum(1).clamp_min(1)
        # a one-token document has nothing to predict: perplexity 1 (neutral), never a crash
        return [math.exp(min(float(x), 700.0)) if n > 0 else 1.0 for x, n in zip(per_doc, valid.sum(1))]
