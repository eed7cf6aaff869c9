"""A supervised fastText classifier (the `fasttext-wheel` package) for advertisement/quality labels: trained from
user-labelled JSONL with `moefy data train-classifier`, its quality measured on a held-out split.

fasttext-wheel 0.9.2's `predict` builds arrays with `np.array(copy=False)`, which NumPy 2 rejects; we call its
compiled predictor directly, which returns plain (probability, label) pairs."""

from __future__ import annotations

import json
import random
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from moefy.atomic import atomic_output
from moefy.errors import MoefyError

PREFIX = "__label__"


@dataclass(frozen=True)
class ClassifierReport:
    positive: str
    train_examples: int
    heldout_examples: int
    threshold: float
    precision: float
    recall: float
    f1: float
    accuracy: float


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()  # fastText reads one example per line


class AdClassifier:
    """A classifier directory written by `train_classifier`: model.bin and report.json (which names the positive
    label)."""

    def __init__(self, directory: Path):
        import fasttext

        directory = Path(directory)
        model, report = directory / "model.bin", directory / "report.json"
        if not model.is_file() or not report.is_file():
            raise MoefyError(f"{directory} is not a moefy classifier (needs model.bin and report.json from "
                             "`moefy data train-classifier`)")
        fasttext.FastText.eprint = lambda *_: None  # its load_model prints an API-change notice to stderr
        try:
            self.positive = json.loads(report.read_text())["positive"]
            self.model = fasttext.load_model(str(model))
        except (ValueError, RuntimeError, KeyError) as exc:
            raise MoefyError(f"cannot read classifier {directory}: {str(exc).splitlines()[0]}") from exc

    def score(self, text: str) -> float:
        """Probability of the positive label."""
        pairs = self.model.f.predict(_clean(text) + "\n", -1, 0.0, "replace")
        return next((p for p, label in pairs if label == PREFIX + self.positive), 0.0)


def train_classifier(labelled: Path, out: Path, positive: str, label_field: str = "label", text_field: str = "text",
                     heldout: float = 0.2, epochs: int = 25, seed: int = 0, overwrite: bool = False
                     ) -> ClassifierReport:
    import fasttext

    examples = _read_labelled(Path(labelled), text_field, label_field)
    labels = sorted({label for _, label in examples})
    if len(labels) < 2:
        raise MoefyError(f"{labelled}: every example has label {labels[0]!r}; a classifier needs at least two classes")
    if positive not in labels:
        raise MoefyError(f"{labelled}: no example has the positive label {positive!r} (labels: {', '.join(labels)})")
    rng = random.Random(seed)
    train, test = [], []
    for label in labels:  # stratified: every class in both splits
        group = [e for e in examples if e[1] == label]
        rng.shuffle(group)
        n_test = max(1, round(heldout * len(group))) if len(group) > 1 else 0
        test += group[:n_test]
        train += group[n_test:]
    rng.shuffle(train)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.txt"
        data.write_text("".join(f"{PREFIX}{label} {_clean(text)}\n" for text, label in train))
        # one thread and a seed: the same data gives the same model
        model = fasttext.train_supervised(input=str(data), epoch=epochs, lr=0.5, wordNgrams=2, minn=2, maxn=4,
                                          thread=1, seed=seed, verbose=0)
    out = Path(out)
    with atomic_output(out, overwrite) as tmp:
        model.save_model(str(tmp / "model.bin"))
        (tmp / "report.json").write_text(json.dumps({"positive": positive}))
        report = _evaluate(AdClassifier(tmp), test, positive, len(train))
        (tmp / "report.json").write_text(json.dumps(asdict(report), indent=2))
    return report


def _evaluate(clf: AdClassifier, test: list[tuple[str, str]], positive: str, n_train: int,
              threshold: float = 0.5) -> ClassifierReport:
    tp = fp = fn = tn = 0
    for text, label in test:
        predicted = clf.score(text) >= threshold
        actual = label == positive
        tp, fp, fn, tn = tp + (predicted and actual), fp + (predicted and not actual), \
            fn + (not predicted and actual), tn + (not predicted and not actual)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ClassifierReport(positive, n_train, len(test), threshold, precision, recall, f1,
                            (tp + tn) / len(test) if test else float("nan"))


def _read_labelled(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    if not path.is_file():
        raise MoefyError(f"labelled examples not found: {path}")
    examples, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, label = record[text_field], record[label_field]
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += 1
            continue
        if isinstance(text, str) and text.strip() and isinstance(label, (str, int, bool)):
            examples.append((text, str(label).replace(" ", "_")))
        else:
            bad += 1
    if not examples:
        raise MoefyError(f"{path}: no usable examples (need JSON lines with '{text_field}' and '{label_field}'; "
                         f"{bad} unusable)")
    return examples
