"""Read text corpora with an optional domain label per document.

Accepted: a .jsonl file (`text` and optional `domain` fields), a .parquet file (same fields, needs pyarrow), a .txt
file (one domain, documents separated by blank lines), a directory of such files or of per-domain subdirectories
(one domain per file stem or subdirectory), or a saved HF `datasets` directory (needs the datasets package)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from moefy.errors import MoefyError

DEFAULT_DOMAIN = "default"


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


def load_corpus(path: str | Path, text_field: str = "text", domain_field: str = "domain") -> Corpus:
    from moefy.data.filtering import kept_corpus_path

    path = Path(path)
    if not path.exists():
        raise MoefyError(f"corpus not found: {path}")
    if path.is_dir() and kept_corpus_path(path) is not None:  # a `moefy data filter` output: its kept corpus
        path = kept_corpus_path(path)
    skipped: Counter = Counter()
    if path.is_dir() and is_saved_dataset(path):
        docs = _read_hf_dataset(path, text_field, domain_field)
    elif path.is_dir():
        docs = []
        for child in sorted(path.iterdir()):
            if child.is_dir():
                docs += [Document(t, child.name) for f in sorted(child.rglob("*.txt")) for t in _read_txt(f, skipped, whole=True)]
            elif child.suffix in (".jsonl", ".txt", ".parquet"):
                docs += _read_file(child, text_field, domain_field, skipped, default_domain=child.stem)
    else:
        docs = _read_file(path, text_field, domain_field, skipped, default_domain=DEFAULT_DOMAIN)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        extra = f" ({_describe(skipped)} skipped)" if skipped else ""
        raise MoefyError(f"corpus {path} has no documents with text{extra}")
    if skipped:  # never silently: every command that reads a corpus says so, and saves the counts with its output
        print(f"moefy: corpus {path}: skipped {_describe(skipped)}", file=sys.stderr)
    return Corpus(str(path), tuple(docs), skipped)


def is_saved_dataset(path: Path) -> bool:
    """A `datasets` save_to_disk directory (a Dataset has both files; a DatasetDict has dataset_dict.json)."""
    return ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()) \
        or (path / "dataset_dict.json").is_file()


def _describe(skipped: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))


def _read_file(path: Path, text_field: str, domain_field: str, skipped: Counter, default_domain: str) -> list[Document]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field, domain_field, skipped, default_domain)
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field, domain_field, default_domain)
    if path.suffix == ".txt":
        return [Document(t, default_domain) for t in _read_txt(path, skipped, whole=False)]
    raise MoefyError(f"unsupported corpus file {path}: use .jsonl, .parquet, .txt or a directory of them")


def _read_jsonl(path: Path, text_field: str, domain_field: str, skipped: Counter, default_domain: str) -> list[Document]:
    docs, saw_text_field = [], False
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["undecodable lines"] += 1
                continue
            except json.JSONDecodeError:
                skipped["malformed JSON lines"] += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                skipped[f"records without a string '{text_field}' field"] += 1
                continue
            saw_text_field = True
            docs.append(Document(record[text_field], str(record.get(domain_field) or default_domain)))
    if not saw_text_field and skipped:
        raise MoefyError(f"{path}: no record has a string '{text_field}' field ({_describe(skipped)})")
    return docs


def _read_txt(path: Path, skipped: Counter, whole: bool) -> list[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skipped["undecodable files"] += 1
        return []
    if whole:
        return [text]
    return [p for p in text.split("\n\n") if p.strip()]


def _read_parquet(path: Path, text_field: str, domain_field: str, default_domain: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MoefyError("reading Parquet corpora needs pyarrow: pip install pyarrow") from exc
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise MoefyError(f"{path} is not a readable Parquet file: {str(exc).splitlines()[0]}") from exc
    if text_field not in table.column_names:
        raise MoefyError(f"{path} has no '{text_field}' column (columns: {', '.join(table.column_names)})")
    texts = table.column(text_field).to_pylist()
    domains = table.column(domain_field).to_pylist() if domain_field in table.column_names else [None] * len(texts)
    return [Document(t, str(d or default_domain)) for t, d in zip(texts, domains) if isinstance(t, str)]


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
