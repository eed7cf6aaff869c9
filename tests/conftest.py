"""Shared fixtures: tiny random LLaMA checkpoints (with a byte-level tokenizer) built in temp dirs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from make_shape import save_byte_tokenizer  # noqa: E402  (one byte-level tokenizer for tiny models and shapes)

# Keep the dequantised SmolLM2 cache inside the repo (gitignored) and silence progress bars in tests.
os.environ.setdefault("MOEFY_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
os.environ["MOEFY_QUIET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


def make_tiny_llama(directory: Path, *, intermediate: int = 48, layers: int = 2, seed: int = 0, hidden: int = 32,
                    shard_bytes: str | None = None, model_type: str = "llama", tokenizer_from: Path | None = None,
                    **overrides) -> Path:
    """tokenizer_from: copy that model's tokenizer (llama.cpp's converter only takes tokenizers it recognises)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is None:
        vocab = save_byte_tokenizer(directory)
    else:
        for f in Path(tokenizer_from).glob("tokenizer*"):
            shutil.copy(f, directory / f.name)
        vocab = len(AutoTokenizer.from_pretrained(directory))
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, **{"tie_word_embeddings": False, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than default-init weights, so FFN errors would show in the logits
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else None
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_moe(tiny_llama, tmp_path_factory) -> Path:
    """A 4-expert top-2 Mixtral built from tiny_llama (read-only for the tests that share it)."""
    from moefy import api
    from moefy.construct.recipe import BuildRecipe
    from moefy.recipes import validate_recipe

    out = tmp_path_factory.mktemp("moe") / "moe"
    recipe = validate_recipe(BuildRecipe, {"model": str(tiny_llama), "experts": 4, "top_k": 2, "method": "cluster"})
    api.build(recipe, out)
    return out


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory) -> Path:
    """FFN width 50 (not divisible by 4 or 8) and several safetensors shards."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "sharded", intermediate=50, layers=3,
                           shard_bytes="40KB")

# Files a person may want to look at after a test run (e.g. the rendered analyze report).
ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"


def write_domain_corpus(path: Path, alphabets: dict[str, str], docs: dict[str, int], chars: dict[str, int],
                        seed: int) -> Path:
    """A JSONL corpus of random texts, each domain drawn from its own alphabet (so domains are distinguishable)."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as fh:
        for domain, alphabet in alphabets.items():
            for _ in range(docs[domain]):
                text = "".join(rng.choice(alphabet) for _ in range(chars[domain]))
                fh.write(json.dumps({"text": text, "domain": domain}) + "\n")
    return path


@pytest.fixture(scope="session")
def llama3(tmp_path_factory) -> Path:
    """FFN width 64, 3 layers: the reconstruction and GPU tests' model."""
    return make_tiny_llama(tmp_path_factory.mktemp("llama3") / "llama", intermediate=64, layers=3)


@pytest.fixture(scope="session")
def ab_corpus(tmp_path_factory) -> Path:
    """Two domains of 8 documents, letters and digits: the reconstruction and GPU tests' calibration data."""
    return write_domain_corpus(tmp_path_factory.mktemp("ab") / "c.jsonl", {"a": "ab ", "d": "0123 "},
                               {"a": 8, "d": 8}, {"a": 300, "d": 300}, seed=0)
