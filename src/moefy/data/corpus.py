"""Text corpora as documents with a domain label: a view over data.records (the one reader), plus saved HF
`datasets` directories (needs the datasets package).

Accepted: a .jsonl file (`text` and optional `domain` fields), a .parquet file (same fields, needs pyarrow), a .txt
file (one domain, documents separated by blank lines), a directory of such files or of per-domain subdirectories
(one domain per file stem or subdirectory), a `moefy data filter` output (its kept corpus), or a saved dataset."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from moefy.data.records import DEFAULT_DOMAIN, is_saved_dataset, kept_corpus_path, read_records
from moefy.errors import MoefyError


@dataclass(frozen=True)
class Document:
    text: str
    domain: str


@dataclass(frozen=True)
class Corpus:
    source: str
    docs: tuple[Document, ...]
    skipped: Counter = field(default_factory=Counter)  # reason -> count of records skipped (never silently)

    def summary(self) -> dict:
        """What was read, for the outputs of every command that reads a corpus."""
        return {"source": self.source, "documents": len(self.docs), "skipped": dict(self.skipped)}

    def domains(self) -> list[str]:
        return sorted({d.domain for d in self.docs})

    def by_domain(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {d: [] for d in self.domains()}
        for doc in self.docs:
            out[doc.domain].append(doc.text)
        return out


# A record's problem (data.records) as counted in a corpus summary.
_SKIP_REASONS = {"undecodable line": "undecodable lines", "malformed JSON line": "malformed JSON lines",
                 "undecodable file": "undecodable files"}


def load_corpus(path: str | Path, text_field: str = "text", domain_field: str = "domain") -> Corpus:
    path = Path(path)
    if not path.exists():
        raise MoefyError(f"corpus not found: {path}")
    if path.is_dir() and kept_corpus_path(path) is not None:  # a `moefy data filter` output: its kept corpus
        path = kept_corpus_path(path)
    skipped: Counter = Counter()
    if path.is_dir() and is_saved_dataset(path):
        docs = _read_hf_dataset(path, text_field, domain_field)
    else:
        records = read_records(path, text_field, domain_field)
        for r in records:
            if r.text is None:
                skipped[_SKIP_REASONS.get(r.problem, f"records without a string '{text_field}' field")] += 1
        for name in sorted({r.file for r in records if r.file.endswith(".jsonl")}):
            mine = [r for r in records if r.file == name]
            if all(r.text is None for r in mine):  # a whole file of the wrong shape is a mistake, not noise
                raise MoefyError(f"{path if path.is_file() else path / name}: no record has a string "
                                 f"'{text_field}' field ({_describe(Counter(r.problem for r in mine))})")
        docs = [Document(r.text, r.domain) for r in records if r.text is not None]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        extra = f" ({_describe(skipped)} skipped)" if skipped else ""
        raise MoefyError(f"corpus {path} has no documents with text{extra}")
    if skipped:  # never silently: every command that reads a corpus says so, and saves the counts with its output
        print(f"moefy: corpus {path}: skipped {_describe(skipped)}", file=sys.stderr)
    return Corpus(str(path), tuple(docs), skipped)


def _describe(skipped: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))


def _read_hf_dataset(path: Path, text_field: str, domain_field: str) -> list[Document]:
    try:
        from datasets import load_from_disk
    except ImportError as exc:
        raise MoefyError("reading a saved HF dataset needs the datasets package: pip install datasets") from exc
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # datasets raises assorted types for damaged or foreign directories
        raise MoefyError(f"{path} looks like a saved HF dataset but could not be read: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if hasattr(ds, "keys"):  # a DatasetDict: use its train split
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    if text_field not in ds.column_names:
        raise MoefyError(f"{path} has no '{text_field}' column (columns: {', '.join(ds.column_names)})")
    domains = ds[domain_field] if domain_field in ds.column_names else [None] * len(ds)
    return [Document(t, str(d or DEFAULT_DOMAIN)) for t, d in zip(ds[text_field], domains) if isinstance(t, str)]
