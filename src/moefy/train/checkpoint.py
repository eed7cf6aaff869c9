"""Training checkpoints: atomic directories, keep-last-n. Each holds the trainable weights (safetensors), the
optimizer and scheduler state (tensors only, loaded with weights_only=True: no arbitrary pickle), the sampler state,
the gating state, and the loop position. No RNG state: the sampler keeps its own, and torch's draws are seeded per
step (train.loop)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moefy.atomic import atomic_output
from moefy.errors import MoefyError

CKPT_DIR = "checkpoints"


def save_checkpoint(run: Path, step: int, *, stage: int, stage_step: int, weights: dict, gating_state: dict,
                    optimizer_state: dict, sharded: bool, scheduler, sampler_state: dict, touched: list[str],
                    keep_last: int) -> Path:
    """`sharded`: written under FSDP, so `optimizer_state` is keyed by parameter name (torch.distributed.checkpoint's
    full optimizer state dict), not by position."""
    target = run / CKPT_DIR / f"step-{step:07d}"
    with atomic_output(target, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        save_file({k: v.contiguous() for k, v in gating_state.items()} or {"_": torch.zeros(1)},
                  str(tmp / "gating.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "sharded": sharded},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "stage": stage, "stage_step": stage_step, "sampler": sampler_state, "touched": touched},
            default=_jsonable))
    for old in sorted((run / CKPT_DIR).glob("step-*"))[:-keep_last]:
        shutil.rmtree(old)
    return target


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted((run / CKPT_DIR).glob("step-*")) if (run / CKPT_DIR).is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    try:
        state = json.loads((path / "state.json").read_text())
        blob = torch.load(path / "optimizer.pt", weights_only=True)
        weights = load_file(str(path / "trainable.safetensors"))
        gating = load_file(str(path / "gating.safetensors"))
    # A damaged optimizer.pt fails inside torch's restricted unpickler (UnpicklingError, EOFError).
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError) as exc:
        raise MoefyError(f"corrupt checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    gating.pop("_", None)
    return {"sharded": False, **state, **blob, "weights": weights, "gating": gating}


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(type(x))
