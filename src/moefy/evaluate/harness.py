"""lm-evaluation-harness tasks through its HF backend, on a model object we already loaded.

`tasks` entries are harness task names (their data comes from the hub, so they need a network) or paths to local
task YAML files (lm-eval's custom-task format over local JSONL), which run offline."""

from __future__ import annotations

from pathlib import Path

import yaml

from moefy.errors import MoefyError


def _split(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names, include dirs): a YAML path contributes its directory and the task name inside it."""
    names, include = [], []
    for t in tasks:
        path = Path(t)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise MoefyError(f"task file not found: {path}")
            spec = yaml.safe_load(path.read_text()) or {}
            if "task" not in spec:
                raise MoefyError(f"{path} is not an lm-eval task file (no 'task' field)")
            names.append(str(spec["task"]))
            include.append(str(path.resolve().parent))
        else:
            names.append(t)
    return names, sorted(set(include))


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """{task: {metric: value}} for each task (stderr entries dropped)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise MoefyError("--tasks needs lm-evaluation-harness: pip install 'moefy[eval]' (or lm-eval)") from exc
    names, include = _split(tasks)
    local_only = len(include) > 0 and all(Path(t).suffix in (".yaml", ".yml") for t in tasks)
    # Indexing the harness's thousands of built-in task files takes minutes on a small CPU: skip it when every
    # task asked for is a local file.
    manager = TaskManager(include_path=include or None, include_defaults=not local_only)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise MoefyError(f"unknown lm-eval task(s): {', '.join(unknown)} (a name from the harness, or a task YAML path)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, verbosity="ERROR")
    except Exception as exc:  # offline hub tasks fail deep inside datasets with assorted types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoefyError(f"lm-eval could not run {', '.join(names)} (offline? use a local task YAML): {first}") from exc
    skip = ("stderr", "sample_len", "alias")
    return {task: {k.split(",")[0]: v for k, v in metrics.items()
                   if not any(s in k for s in skip) and isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}
