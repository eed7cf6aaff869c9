"""`moefy data generate MODEL --out FILE.jsonl`: calibration text sampled from the dense model itself.

A build fitted on a narrow calibration corpus carries that corpus's statistics: its partition, routers and
reconstructed experts serve the calibration domains and lose more elsewhere (docs/results.md, reconstruction on
unseen text). The model's own samples cover what it was trained on without any outside data, as LLM-QAT's data-free
distillation does: each sequence starts from a random vocabulary token (seeded) and continues by plain sampling at
temperature 1, so the text follows the model's distribution rather than its greedy modes. Written as one JSONL
file of one or more domains, to put beside the user's own calibration files."""

from __future__ import annotations

import json
from pathlib import Path

from moefy.progress import progress

SELF_DOMAIN = "self"


def sample_texts(model, tokenizer, tokens: int, seq_len: int = 256, batch_size: int = 32, seed: int = 0,
                 temperature: float = 1.0) -> list[str]:
    """`ceil(tokens / seq_len)` sequences of `seq_len` sampled tokens each, decoded. Deterministic for a seed on one
    device: the start tokens come from their own generator and sampling from a forked global RNG."""
    import torch  # here, not at module import: the CLI reads SELF_DOMAIN for its help text

    count = -(-tokens // seq_len)
    device = next(model.parameters()).device
    starts = torch.randint(0, len(tokenizer), (count, 1), generator=torch.Generator().manual_seed(seed))
    bos = tokenizer.bos_token_id
    if bos is not None:  # a BOS first, as in training; the random token then picks the topic
        starts = torch.cat([torch.full((count, 1), bos), starts], dim=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for first in progress(range(0, count, batch_size), "sampling calibration text"):
            ids = starts[first:first + batch_size].to(device)
            # min_new_tokens: no sequence ends early at an EOS, so every one is seq_len tokens
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=seq_len, min_new_tokens=seq_len,
                                 pad_token_id=pad)
            texts += tokenizer.batch_decode(out[:, 1 if bos is None else 2:].cpu(), skip_special_tokens=True)
    return texts


def domain_names(domain: str, domains: int) -> list[str]:
    """The labels of `domains` sampled domains: the name itself for one, `name-1` … `name-N` for several."""
    return [domain] if domains == 1 else [f"{domain}-{i + 1}" for i in range(domains)]


def write_texts(texts: list[str], path: Path, domain: str = SELF_DOMAIN, provenance: dict | None = None,
                domains: int = 1) -> None:
    """One JSONL record per text, `{"text", "domain", "generated"}`: the reader keeps the extra field, so the
    settings that made each text travel with it. With several `domains`, consecutive equal shares of the texts get
    one label each: a build budgets its calibration tokens per domain, so N sampled domains bring N budgets of
    sampled text (one domain of 64k tokens would contribute 4,096 of them to profiling)."""
    names = domain_names(domain, domains)
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            label = names[i * len(names) // len(texts)]
            fh.write(json.dumps({"text": text, "domain": label, "generated": provenance or {}},
                                ensure_ascii=False) + "\n")
