"""The one corpus reader: records as they are on disk. Nothing is normalised away, so the filter can write a corpus
back in its own format: a JSONL line keeps its exact bytes and extra fields, a Parquet row keeps every column, and a
malformed record is kept too, with the reason it cannot be read. `corpus.load_corpus` is a view over these records.

Layouts: one .jsonl/.parquet/.txt file, or a directory of such files (domain = file stem unless a record names one)
and of per-domain subdirectories of .txt files (one document per file). A `moefy data filter` output directory
stands for its kept corpus (kept_corpus_path); a saved HF dataset is read by corpus.load_corpus only."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from moefy.errors import MoefyError

FILE_KINDS = (".jsonl", ".parquet", ".txt")
DEFAULT_DOMAIN = "default"
# What `moefy data filter` writes: its recipe, the source's name, and the kept corpus in the input's own format.
FILTER_RECIPE = "moefy_filter.yaml"
FILTER_SOURCE = "source.json"
KEPT_DIR = "data"


def is_saved_dataset(path: Path) -> bool:
    """A `datasets` save_to_disk directory (a Dataset has both files; a DatasetDict has dataset_dict.json)."""
    return ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()) \
        or (path / "dataset_dict.json").is_file()


def kept_corpus_path(directory: Path) -> Path | None:
    """Where a filter output keeps its corpus, so `moefy train --data FILTERED` works; None if not one."""
    if not (directory / FILTER_RECIPE).is_file():
        return None
    try:
        name = json.loads((directory / FILTER_SOURCE).read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MoefyError(f"{directory} looks like a filter output but its {FILTER_SOURCE} is damaged: {exc}") from exc
    single = directory / KEPT_DIR / name
    return single if single.is_file() else directory / KEPT_DIR


@dataclass(frozen=True)
class Record:
    file: str  # path relative to the corpus root (the file's own name for a one-file corpus)
    index: int  # position in that file
    raw: object  # jsonl: the line's bytes; parquet: the row dict; txt: the paragraph or whole file text
    text: str | None  # None when malformed
    domain: str
    problem: str | None = None  # why the record is malformed

    def as_json(self) -> object:
        """The record itself, JSON-serialisable: parsed JSON where it parses, else text, else base64 bytes."""
        if isinstance(self.raw, bytes):
            try:
                return json.loads(self.raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                try:
                    return {"unparsed_line": self.raw.decode("utf-8")}
                except UnicodeDecodeError:
                    return {"unparsed_line_base64": base64.b64encode(self.raw).decode("ascii")}
        return self.raw


def read_records(path: Path, text_field: str = "text", domain_field: str = "domain") -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise MoefyError(f"corpus not found: {path}")
    if path.is_file():
        return _read_file(path, path.name, text_field, domain_field, DEFAULT_DOMAIN)
    if is_saved_dataset(path):
        raise MoefyError(f"{path} is a saved HF dataset; filter reads .jsonl, .parquet or .txt corpora "
                         "(export it with dataset.to_json(...))")
    records: list[Record] = []
    for child in sorted(path.iterdir()):
        if child.is_dir():
            for f in sorted(child.rglob("*.txt")):
                records += _read_txt(f, str(f.relative_to(path)), child.name, whole=True)
        elif child.suffix in FILE_KINDS:
            records += _read_file(child, child.name, text_field, domain_field, child.stem)
    return records


def write_records(records: list[Record], out: Path, single_file: bool) -> None:
    """Write records back in their files' own formats under `out` (a file path for a one-file corpus)."""
    by_file: dict[str, list[Record]] = {}
    for r in records:
        by_file.setdefault(r.file, []).append(r)
    for name, rows in by_file.items():
        target = out if single_file else out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            target.write_bytes(b"".join(r.raw.rstrip(b"\r\n") + b"\n" for r in rows))
        elif name.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([r.raw for r in rows]), target)
        elif len(rows) == 1 and rows[0].index == -1:  # a whole-file document
            target.write_text(rows[0].raw)
        else:
            target.write_text("\n\n".join(r.raw for r in rows) + "\n")


def _read_file(path: Path, name: str, text_field: str, domain_field: str, default_domain: str) -> list[Record]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, name, text_field, domain_field, default_domain)
    if path.suffix == ".parquet":
        return _read_parquet(path, name, text_field, domain_field, default_domain)
    if path.suffix == ".txt":
        return _read_txt(path, name, default_domain, whole=False)
    raise MoefyError(f"unsupported corpus file {path}: use .jsonl, .parquet, .txt or a directory of them")


def _read_jsonl(path, name, text_field, domain_field, default_domain) -> list[Record]:
    out = []
    with open(path, "rb") as fh:
        for i, raw in enumerate(line for line in fh if line.strip()):
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(Record(name, i, raw, None, default_domain, "undecodable line"))
                continue
            except json.JSONDecodeError:
                out.append(Record(name, i, raw, None, default_domain, "malformed JSON line"))
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                out.append(Record(name, i, raw, None, default_domain, f"no string '{text_field}' field"))
                continue
            out.append(Record(name, i, raw, record[text_field], str(record.get(domain_field) or default_domain)))
    return out


def _read_parquet(path, name, text_field, domain_field, default_domain) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MoefyError("reading Parquet corpora needs pyarrow: pip install pyarrow") from exc

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types for damaged files
        raise MoefyError(f"{path} is not a readable Parquet file: {str(exc).splitlines()[0]}") from exc
    if text_field not in table.column_names:  # a wrong field name, not malformed rows
        raise MoefyError(f"{path} has no '{text_field}' column (columns: {', '.join(table.column_names)})")
    rows = table.to_pylist()
    out = []
    for i, row in enumerate(rows):
        text = row.get(text_field)
        domain = str(row.get(domain_field) or default_domain)
        ok = isinstance(text, str)
        problem = None if ok else f"no string '{text_field}' field"
        out.append(Record(name, i, row, text if ok else None, domain, problem))
    return out


def _read_txt(path: Path, name: str, domain: str, whole: bool) -> list[Record]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [Record(name, -1, data, None, domain, "undecodable file")]
    if whole:
        return [Record(name, -1, text, text, domain)]
    return [Record(name, i, p, p, domain) for i, p in enumerate(p for p in text.split("\n\n") if p.strip())]
