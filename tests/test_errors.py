"""Bad input: one clear line, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefy import cli
from conftest import make_tiny_llama


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("moefy: error: ")
    assert fragment in err, err


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "moefy-tmp" in p.name or "moefy-old" in p.name]


@pytest.mark.parametrize("argv,fragment", [
    (["--experts", "4", "--top-k", "5"], "top_k must be between 1 and the number of experts"),
    (["--experts", "0"], "experts must be at least 1"),
    (["--experts", "49", "--top-k", "2"], "cannot make 49 experts from an FFN of width 48"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--scale", "-1"], "scale must be positive"),
    (["--device", "tpu7"], "unknown device 'tpu7'"),
    pytest.param(["--device", "cuda"], "torch sees no CUDA GPU here", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU (tests/test_gpu.py covers cuda:N)")),
])
def test_impossible_settings(capsys, tiny_llama, tmp_path, argv, fragment):
    code, err = run_cli(capsys, "build", tiny_llama, "--out", tmp_path / "moe", *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "moe").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("model_type,overrides,fragment", [
    ("gpt2", {}, "architecture 'gpt2' is not supported yet; supported: llama, mistral"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "not SiLU"),
])
def test_unsupported_architectures(capsys, tiny_llama, tmp_path, model_type, overrides, fragment):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_llama.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.update(model_type=model_type, **overrides)
    (src / "config.json").write_text(json.dumps(config))
    code, err = run_cli(capsys, "build", src, "--out", tmp_path / "moe")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "moe").exists()


def test_qk_norm_is_refused(capsys, tmp_path):
    src = make_tiny_llama(tmp_path / "src")
    from safetensors.torch import load_file, save_file
    w = load_file(str(src / "model.safetensors"))
    w["model.layers.0.self_attn.q_norm.weight"] = w["model.norm.weight"].clone()
    save_file(w, str(src / "model.safetensors"))
    capsys.readouterr()
    code, err = run_cli(capsys, "build", src, "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "QK-norm")


def test_missing_model(capsys, tmp_path):
    code, err = run_cli(capsys, "build", tmp_path / "nowhere", "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "no such model directory or file")
    code, err = run_cli(capsys, "build", tmp_path / "absent.gguf", "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "no such model")


def test_hub_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(capsys, "build", "someone/some-model", "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "could not be fetched from the Hugging Face hub")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_files(capsys, tiny_llama, tmp_path):
    bad_weights = _copy(tiny_llama, tmp_path / "w")
    (bad_weights / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    code, err = run_cli(capsys, "build", bad_weights, "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "corrupt or unreadable safetensors file")

    truncated = _copy(tiny_llama, tmp_path / "t")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, "build", truncated, "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "corrupt")

    bad_config = _copy(tiny_llama, tmp_path / "c")
    (bad_config / "config.json").write_text("{ not json")
    code, err = run_cli(capsys, "build", bad_config, "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "corrupt config file")

    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF but not really")
    code, err = run_cli(capsys, "build", bad_gguf, "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "could not read GGUF file")
    assert not (tmp_path / "moe").exists() and not leftovers(tmp_path)


def test_pickle_only_checkpoint_is_refused(capsys, tiny_llama, tmp_path):
    src = _copy(tiny_llama, tmp_path / "p")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    code, err = run_cli(capsys, "build", src, "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "pickle")


def test_existing_output_needs_overwrite(capsys, tiny_llama, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, "build", tiny_llama, "--out", out, "--experts", "4")
    assert_one_line_error(code, err, "already exists; pass --overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    assert run_cli(capsys, "build", tiny_llama, "--out", out, "--experts", "4", "--overwrite")[0] == 0
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    assert not leftovers(tmp_path)


def test_failure_midway_leaves_nothing(capsys, tiny_llama, tmp_path, monkeypatch):
    import moefy.api

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(moefy.api, "write_checkpoint", explode)
    code, err = run_cli(capsys, "build", tiny_llama, "--out", tmp_path / "moe", "--experts", "4")
    assert_one_line_error(code, err, "disk full")
    assert not (tmp_path / "moe").exists() and not leftovers(tmp_path)


def test_recipe_errors_and_resolution(capsys, tiny_llama, tmp_path):
    recipe = tmp_path / "build.yaml"
    recipe.write_text(f"model: {tiny_llama}\nexperts: 4\ntop_k: 1\nmethod: cluster\nbogus: 1\n")
    code, err = run_cli(capsys, "build", "--recipe", recipe, "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "bogus: Extra inputs are not permitted")

    code, err = run_cli(capsys, "build", "--recipe", tmp_path / "missing.yaml", "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "recipe file not found")

    recipe.write_text(f"model: {tiny_llama}\nexperts: 4\ntop_k: 1\nmethod: cluster\ncluster:\n  rows: gate\n")
    code, _ = run_cli(capsys, "build", "--recipe", recipe, "--out", tmp_path / "moe", "--seed", "5")
    assert code == 0
    import yaml
    saved = yaml.safe_load((tmp_path / "moe" / "moefy.yaml").read_text())
    assert (saved["experts"], saved["top_k"], saved["seed"], saved["cluster"]["rows"]) == (4, 1, 5, "gate")
    assert saved["method"] == "cluster" and saved["model"] == str(tiny_llama)


def test_verify_errors(capsys, tiny_llama, tmp_path):
    code, err = run_cli(capsys, "verify", tiny_llama, "--dense", tiny_llama)
    assert_one_line_error(code, err, "has no moefy_plan.json")


def test_real_entry_point_exit_code(tiny_llama, tmp_path):
    env = {**os.environ, "MOEFY_QUIET": "1"}
    proc = subprocess.run([sys.executable, "-m", "moefy", "build", str(tiny_llama), "--out", str(tmp_path / "m"),
                           "--experts", "3", "--top-k", "4"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "moefy: error: invalid recipe: top_k must be between 1 and the number of experts 3 (got 4)"]
