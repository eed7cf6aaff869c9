"""`moefy data demo-corpus OUT`: a multi-domain corpus made only from files every Python install has.

Four domains a model tells apart: `code` (stdlib Python source), `docs` (the language reference prose that pydoc
ships), `html` (pydoc's HTML pages for stdlib modules) and `unicode` (the Unicode character database as tab-separated
rows). Written as OUT/calib/<domain>.jsonl and OUT/heldout/<domain>.jsonl, split by a hash of each document, so the
split is the same on every machine with the same Python. OUT/unseen/ holds text of none of the four domains, the
READMEs of the installed Python packages: how a build does off its calibration domains (it depends on what is
installed). This is a demo corpus, not a benchmark."""

from __future__ import annotations

import hashlib
import json
import pydoc
import random
import re
import sys
import sysconfig
import unicodedata
import warnings
from pathlib import Path

import yaml

from moefy.atomic import atomic_output

DOC_CHARS = 4000  # documents are cut to this many characters, so no single file dominates a domain
MAX_CHARS_PER_DOMAIN = 400_000
HELDOUT_PERCENT = 15
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_HTML_MODULES = ("json", "csv", "textwrap", "shutil", "pathlib", "heapq", "bisect", "fractions", "statistics",
                 "string", "difflib", "calendar", "glob", "fnmatch", "queue", "sched", "secrets", "uuid", "zipfile",
                 "tarfile", "gzip", "base64", "hashlib", "hmac", "html", "ipaddress", "getopt", "argparse",
                 "logging", "typing", "enum", "dataclasses", "functools", "itertools", "operator", "copy", "pprint",
                 "reprlib", "graphlib", "contextlib", "abc", "numbers", "decimal", "random", "datetime", "time")


def _code() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    return [p.read_text(encoding="utf-8", errors="replace")[:DOC_CHARS] for p in files]


def _docs() -> list[str]:
    from pydoc_data.topics import topics

    return [text.strip()[:DOC_CHARS] for _, text in sorted(topics.items()) if len(text) > 200]


def _html() -> list[str]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _HTML_MODULES:
            module = __import__(name)
            page = pydoc.HTMLDoc().page(name, pydoc.HTMLDoc().docmodule(module))
            page = _ADDRESS.sub("0x0", page)  # object reprs carry memory addresses: keep the corpus reproducible
            out += [page[i:i + DOC_CHARS] for i in range(0, min(len(page), 5 * DOC_CHARS), DOC_CHARS)]
    return out


def _unicode() -> list[str]:
    rows = [f"U+{cp:04X}\t{unicodedata.name(chr(cp))}\t{unicodedata.category(chr(cp))}"
            for cp in range(0x20, 0x30000) if unicodedata.name(chr(cp), "")]
    lines_per_doc = 60
    return ["\n".join(rows[i:i + lines_per_doc]) for i in range(0, len(rows), lines_per_doc * 7)]


DOMAINS = {"code": _code, "docs": _docs, "html": _html, "unicode": _unicode}
UNSEEN_DOMAIN = "package-docs"


def write_package_docs(path: Path) -> int:
    """The long descriptions (READMEs, Markdown or reST) of the installed Python packages, over 1000 characters, as
    one JSONL domain `package-docs`, sorted by package name; returns how many."""
    from importlib.metadata import distributions

    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for dist in sorted(distributions(), key=lambda d: d.metadata["Name"].lower()):
            body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
            if len(body) > 1000:
                fh.write(json.dumps({"text": body, "domain": UNSEEN_DOMAIN}) + "\n")
                count += 1
    return count


def _is_heldout(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


TASK_NAME = "moefy_demo_continuation"
TASK_CHOICES = 4
_PROMPT_CHARS, _CONTINUATION_CHARS = 300, 80


def continuation_task(heldout: dict[str, list[str]], directory: Path, final_directory: Path, seed: int = 0) -> Path:
    """A tiny multiple-choice task in lm-eval's custom YAML format: given the start of a held-out document, pick its
    true continuation among continuations taken from other documents of the same domain (a local HellaSwag).
    The YAML names its data by absolute path (lm-eval resolves data files from the working directory), so it points
    at final_directory, where `directory` ends up after the atomic rename."""
    rng = random.Random(seed)
    items = []
    for domain, texts in sorted(heldout.items()):
        docs = [t for t in texts if len(t) >= _PROMPT_CHARS + _CONTINUATION_CHARS]
        for i, text in enumerate(docs):
            others = [d for j, d in enumerate(docs) if j != i]
            if len(others) < TASK_CHOICES - 1:
                continue
            choices = [text[_PROMPT_CHARS:_PROMPT_CHARS + _CONTINUATION_CHARS]]
            choices += [d[_PROMPT_CHARS:_PROMPT_CHARS + _CONTINUATION_CHARS] for d in rng.sample(others, TASK_CHOICES - 1)]
            order = list(range(TASK_CHOICES))
            rng.shuffle(order)
            items.append({"domain": domain, "context": text[:_PROMPT_CHARS], "choices": [choices[k] for k in order],
                          "label": order.index(0)})
    data = directory / f"{TASK_NAME}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    task = {"task": TASK_NAME, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(final_directory.resolve() / data.name)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "label", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    path = directory / f"{TASK_NAME}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def build_demo_corpus(out: Path, overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Write the demo corpus; returns {domain: {"calib": docs, "heldout": docs}}, and {"unseen": docs} for the
    package READMEs."""
    counts: dict[str, dict[str, int]] = {}
    with atomic_output(Path(out), overwrite) as tmp:
        for split in ("calib", "heldout", "unseen", "tasks"):
            (tmp / split).mkdir()
        counts[UNSEEN_DOMAIN] = {"unseen": write_package_docs(tmp / "unseen" / f"{UNSEEN_DOMAIN}.jsonl")}
        heldout: dict[str, list[str]] = {}
        for domain, make in DOMAINS.items():
            docs, total = [], 0
            for text in make():
                if total >= MAX_CHARS_PER_DOMAIN:
                    break
                docs.append(text)
                total += len(text)
            counts[domain] = {"calib": 0, "heldout": 0}
            files = {s: open(tmp / s / f"{domain}.jsonl", "w", encoding="utf-8") for s in ("calib", "heldout")}
            for text in docs:
                split = "heldout" if _is_heldout(text) else "calib"
                files[split].write(json.dumps({"text": text, "domain": domain}) + "\n")
                counts[domain][split] += 1
            for f in files.values():
                f.close()
            heldout[domain] = [t for t in docs if _is_heldout(t)]
        continuation_task(heldout, tmp / "tasks", Path(out) / "tasks")
        (tmp / "README.md").write_text(
            "# moefy demo corpus\n\nBuilt by `moefy data demo-corpus` from files that ship with Python "
            f"{sys.version.split()[0]}: {', '.join(DOMAINS)}. A demo, not a benchmark.\n"
            "Use `calib/` for calibration and training, `heldout/` for evaluation. `unseen/` holds the READMEs of "
            "the installed Python packages, text of none of the four domains, to see how a model does off them. "
            "`tasks/` holds a multiple-choice "
            "continuation task in lm-eval's custom YAML format (`moefy eval --tasks tasks/"
            f"{TASK_NAME}.yaml`).\n")
    return counts
