"""Per-step training records: one JSON line each in metrics.jsonl (the source of truth, read by the plots and the
tests) and the same numbers as TensorBoard scalars under tensorboard/."""

from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class RunLog:
    def __init__(self, run: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.metrics = run / METRICS
        if resume_step is None:
            self.metrics.unlink(missing_ok=True)
        else:  # a run killed after its last checkpoint logged steps that will now be redone: drop them
            kept = [line for line in self.metrics.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.metrics.write_text("".join(line + "\n" for line in kept))
        # purge_step makes TensorBoard hide the redone steps' old events too
        self.board = SummaryWriter(str(run / TENSORBOARD), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in _scalars(record):
            self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.board.close()


def _scalars(record: dict, prefix: str = ""):
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)):
            yield f"{prefix}{key}", value
