"""Calibration domains for DIVE when labels are missing or too few: documents are embedded by the dense model's
own mean-pooled last hidden states (no extra model), then clustered. Pure functions apart from `embed_documents`."""

from __future__ import annotations

from collections import Counter
from typing import Callable
from dataclasses import replace

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from moefy.data.corpus import Corpus, Document
from moefy.progress import progress


@torch.no_grad()
def embed_documents(model, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 16) -> np.ndarray:
    """[n, H] mean over each document's first `max_tokens` tokens of the final hidden state. Documents go through
    in batches of similar length (right-padded, masked out of attention and of the mean)."""
    ids = [tokenizer(t, truncation=True, max_length=max_tokens).input_ids for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.zeros((len(ids), model.config.hidden_size), dtype=np.float32)
    for b in progress(range(0, len(order), batch_size), "embedding documents"):
        chunk = order[b:b + batch_size]
        width = max(len(ids[i]) for i in chunk)
        batch = torch.tensor([ids[i] + [0] * (width - len(ids[i])) for i in chunk])
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk])
        hidden = model.model(input_ids=batch, attention_mask=mask).last_hidden_state.float()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out[chunk] = pooled.numpy()
    return out


def cluster_documents(embeddings: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Labels 0..m-1 from k-means on centred, unit-normalised embeddings (cosine geometry: hidden states share a
    large common direction that would otherwise dominate every distance). Every cluster is non-empty."""
    if m > len(embeddings):
        raise ValueError(f"cannot make {m} clusters from {len(embeddings)} documents")
    x = embeddings - embeddings.mean(0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    _, labels = kmeans2(x.astype(np.float64), m, minit="++", seed=np.random.default_rng(seed), iter=50)
    for c in range(m):  # k-means may empty a cluster: give it the point farthest from its own centroid
        if not (labels == c).any():
            centroids = np.stack([x[labels == k].mean(0) if (labels == k).any() else x[0] for k in range(m)])
            far = np.argmin((x * centroids[labels]).sum(1))
            labels[far] = c
    return labels


def describe_clusters(texts: list[str], labels: np.ndarray, embeddings: np.ndarray, tokenizer,
                      names: list[str], n_docs: int = 3, n_tokens: int = 10) -> dict[str, dict]:
    """Per cluster: size, its most typical documents (closest to the centroid, as openings) and its most typical
    tokens (highest frequency lift over the whole corpus, among tokens seen at least 3 times in the cluster)."""
    x = embeddings - embeddings.mean(0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    counts = [Counter(tokenizer(t).input_ids) for t in texts]
    overall = sum(counts, Counter())
    total = sum(overall.values())
    out = {}
    for c, name in enumerate(names):
        members = np.flatnonzero(labels == c)
        centroid = x[members].mean(0)
        typical = members[np.argsort(-(x[members] @ centroid))][:n_docs]
        local = sum((counts[i] for i in members), Counter())
        size = sum(local.values())
        lift = {t: (n / size) / (overall[t] / total) for t, n in local.items() if n >= 3}
        top = sorted(lift, key=lambda t: (-lift[t], t))[:n_tokens]
        out[name] = {"documents": int(len(members)),
                     "typical_documents": [" ".join(texts[i].split())[:160] for i in typical],
                     "typical_tokens": [tokenizer.decode([t]) for t in top]}
    return out


def relabel(corpus: Corpus, labels: list[str]) -> Corpus:
    return replace(corpus, docs=tuple(Document(d.text, label) for d, label in zip(corpus.docs, labels)))


def split_largest(labels: list[str], embed: Callable[[list[int]], np.ndarray], target: int, seed: int
                  ) -> tuple[list[str], dict]:
    """Split the domain with the most documents in two by clustering its embeddings, until there are `target`
    domains. `embed(indices)` gives those documents' embeddings: only the domains that are split need them.
    Returns the new labels and {new domain: the domain it came from}."""
    labels = list(labels)
    origin: dict[str, str] = {}
    while len(set(labels)) < target:
        sizes = Counter(labels)
        largest, n = max(sorted(sizes.items()), key=lambda kv: kv[1])
        if n < 2:
            raise ValueError(f"cannot split domains further: {len(sizes)} domains of one document each, "
                             f"{target} needed")
        members = [i for i, lab in enumerate(labels) if lab == largest]
        halves = cluster_documents(embed(members), 2, seed)
        for i, half in zip(members, halves):
            labels[i] = f"{largest}.{half}"
        for half in (0, 1):
            origin[f"{largest}.{half}"] = origin.get(largest, largest)
        origin.pop(largest, None)
    return labels, origin


def holdout_split(corpus: Corpus, fraction: float) -> tuple[Corpus, Corpus]:
    """(pruning part, held-out part): every round(1/fraction)-th document of each domain is held out. A domain with
    a single document gives it to both parts (said in the mining report)."""
    every = max(2, round(1 / fraction))
    by_domain: dict[str, list[Document]] = {}
    for d in corpus.docs:
        by_domain.setdefault(d.domain, []).append(d)
    keep, held = [], []
    for docs in by_domain.values():
        if len(docs) == 1:
            keep += docs
            held += docs
            continue
        for i, d in enumerate(docs):
            (held if i % every == every - 1 else keep).append(d)
        if not any(i % every == every - 1 for i in range(len(docs))):
            held.append(docs[-1])
            keep.remove(docs[-1])
    return replace(corpus, docs=tuple(keep)), replace(corpus, docs=tuple(held))
