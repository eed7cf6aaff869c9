"""The build → verify path on tiny random LLaMAs: exactness for every method, layouts, plans, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_domain_corpus
from safetensors import safe_open

from moefy import api
from moefy.construct.plan import PAD, load_plan
from moefy.construct.recipe import BuildRecipe
from moefy.errors import MoefyError
from moefy.recipes import validate_recipe

METHODS = ["random", "sequential", "cluster"]


def build(model, out, **fields):
    return api.build(validate_recipe(BuildRecipe, {"model": str(model), **fields}), out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("experts,top_k", [(4, 2), (8, 2), (3, 1)])
def test_all_experts_uniform_router_reproduce_dense(tiny_sharded, tmp_path, method, experts, top_k):
    # Width 50 is divisible by none of 3, 4, 8: every case here also exercises zero-neuron padding.
    build(tiny_sharded, tmp_path / "moe", experts=experts, top_k=top_k, method=method, seed=3)
    report = api.verify(tmp_path / "moe", str(tiny_sharded))
    assert report.max_abs_dlogits < 1e-4
    assert abs(report.dense_loss - report.uniform_moe_loss) < 1e-4
    # The MoE as built is a different function (top-k, random router). On a near-uniform random tiny model the loss
    # gap is small (~1e-3), so only assert it is there; test_verify_detects_a_broken_expert covers sensitivity.
    assert abs(report.built_moe_loss - report.dense_loss) > 1e-5


# The uniform check, and the per-expert one, which checks every expert (it once stopped at the first 8).
@pytest.mark.parametrize("method, experts, broken", [("random", 4, 0), ("upcycle", 12, 11)])
def test_verify_detects_a_broken_expert(tiny_llama, tmp_path, method, experts, broken):
    out = tmp_path / "moe"
    build(tiny_llama, out, experts=experts, top_k=2, method=method)
    from safetensors.torch import load_file, save_file

    # Corrupt the weights (not the plan): swap two experts' w1 rows in the checkpoint.
    weights = load_file(str(out / "model.safetensors"))
    key = f"model.layers.0.block_sparse_moe.experts.{broken}.w1.weight"
    weights[key] = weights[key].flip(0).contiguous()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert api.verify(out, str(tiny_llama)).max_abs_dlogits > 1e-3, method


def test_output_is_stock_mixtral_in_legacy_layout(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    result = build(tiny_llama, tmp_path / "moe", experts=4, top_k=2, method="cluster")
    assert result.architecture == "MixtralForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert isinstance(model, MixtralForCausalLM)
    with safe_open(str(tmp_path / "moe" / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any("mlp." in k for k in keys)
    for name in ("config.json", "tokenizer.json", "moefy.yaml", "moefy_plan.json", "moefy_plan.safetensors",
                 "README.md"):
        assert (tmp_path / "moe" / name).is_file(), name
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "training-free construction" in card and "refitted" not in card
    assert 'experts_implementation="batched_mm"' in card and "torch.compile" in card  # how to generate fast
    assert "moefy export-gguf" in card  # how to run it in llama.cpp
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (4, 2, 16)


def test_scale_is_folded_into_down_proj(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    build(tiny_llama, tmp_path / "moe", experts=4, top_k=1, method="random", seed=7)
    plan = load_plan(tmp_path / "moe")
    weights = load_file(str(tmp_path / "moe" / "model.safetensors"))
    dense = load_file(str(tiny_llama / "model.safetensors"))
    idx = plan.layers[1].experts[2]
    real = torch.from_numpy(idx != PAD)
    w2 = weights["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    expected = dense["model.layers.1.mlp.down_proj.weight"][:, idx[idx != PAD]] * 4.0  # N/k = 4/1
    torch.testing.assert_close(w2[:, real], expected)
    assert torch.all(w2[:, ~real] == 0)
    assert plan.meta.scales == [4.0, 4.0]


def test_custom_scale_still_exact(tiny_llama, tmp_path):
    build(tiny_llama, tmp_path / "moe", experts=4, top_k=2, scale=1.0)
    assert load_plan(tmp_path / "moe").meta.scales[0] == 1.0
    assert api.verify(tmp_path / "moe", str(tiny_llama)).passed


def test_padding_neurons_are_zero(tiny_sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    build(tiny_sharded, tmp_path / "moe", experts=8, top_k=2, method="sequential")
    plan = load_plan(tmp_path / "moe")
    # ceil(50/8) = 7 neurons, rounded up to 8 for grouped_mm alignment
    assert plan.meta.expert_size == 8 and (plan.layers[0].experts == PAD).sum() == 8 * 8 - 50
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    experts = model.model.layers[0].mlp.experts
    # sequential: 50 = 7+7+6+6+6+6+6+6, so experts 2..7 carry zero neurons in their last two slots
    assert torch.all(experts.down_proj[2:, :, -2:] == 0)
    assert torch.all(experts.gate_up_proj[2:, 6:8, :] == 0)  # gate rows of the padding neurons
    assert torch.all(experts.gate_up_proj[2:, 8 + 6:, :] == 0)  # up rows of the padding neurons


def test_plan_partitions_every_layer(tiny_sharded, tmp_path):
    build(tiny_sharded, tmp_path / "moe", experts=4, top_k=2, method="cluster")
    plan = load_plan(tmp_path / "moe")
    for lp in plan.layers.values():
        real = lp.experts[lp.experts != PAD]
        assert sorted(real.tolist()) == list(range(50))
        sizes = sorted((lp.experts != PAD).sum(axis=1).tolist())
        assert sizes == [12, 12, 13, 13]


def test_same_seed_same_plan_and_weights(tiny_llama, tmp_path):
    for name in ("a", "b", "c"):
        build(tiny_llama, tmp_path / name, experts=4, top_k=2, method="cluster", seed=0 if name != "c" else 1)
    a, b, c = (load_plan(tmp_path / n) for n in "abc")
    for i in a.layers:
        assert np.array_equal(a.layers[i].experts, b.layers[i].experts)
        assert torch.equal(a.layers[i].router, b.layers[i].router)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert not torch.equal(a.layers[0].router, c.layers[0].router)


def test_router_inits(tiny_llama, tmp_path):
    build(tiny_llama, tmp_path / "z", experts=4, top_k=2, router={"kind": "zero"})
    assert torch.count_nonzero(load_plan(tmp_path / "z").layers[0].router) == 0
    build(tiny_llama, tmp_path / "r", experts=4, top_k=2, router={"kind": "random", "std": 0.5})
    std = load_plan(tmp_path / "r").layers[0].router.std().item()
    assert 0.35 < std < 0.65


def test_sharded_output_with_index(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    build(tiny_llama, tmp_path / "moe", experts=4, top_k=2, max_shard_bytes=1024**2)
    files = sorted(p.name for p in (tmp_path / "moe").glob("model*.safetensors"))
    # The tiny model is ~150 KB: one shard. A 1 MiB budget with a bigger model is covered in test_writer.
    assert files == ["model.safetensors"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "moe")


def test_bfloat16_build_is_exact_at_its_precision(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    build(tiny_llama, tmp_path / "moe", experts=4, top_k=2, dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "moe").dtype == torch.bfloat16
    # The scale N/k = 2 is a power of two, so bf16 rounding of scaled weights matches the rounded dense ones.
    assert api.verify(tmp_path / "moe", str(tiny_llama)).max_abs_dlogits < 1e-3


def test_mistral_family_builds(tmp_path):
    from conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "mistral", model_type="mistral", sliding_window=None)
    build(src, tmp_path / "moe", experts=4, top_k=2)
    assert api.verify(tmp_path / "moe", str(src)).passed


def test_shared_fraction_without_a_shared_block_is_refused(tiny_llama, tmp_path):
    with pytest.raises(MoefyError, match="applies to carve and importance"):
        build(tiny_llama, tmp_path / "moe", method="random", experts=4, top_k=2, shared_fraction=0.25)
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("fields", [dict(method="random", experts=4, top_k=4),
                                    dict(method="carve", experts=4, top_k=4, shared_fraction=0.25, calib=True),
                                    dict(method="upcycle", experts=3, top_k=3)])
def test_oracles_with_every_expert_active_are_dense(tiny_llama, tmp_path, fields):
    """At 100% active, each oracle keeps the whole FFN (upcycle: the mean of identical copies), so both equal dense."""
    if fields.get("calib"):  # carve (the shared-neuron case) profiles a calibration corpus
        fields = {**fields, "calib": str(write_domain_corpus(tmp_path / "c.jsonl", {"a": "ab c", "b": "xy z"},
                                                             {"a": 6, "b": 6}, {"a": 200, "b": 200}, seed=1))}
    build(tiny_llama, tmp_path / "moe", **fields)
    r = api.verify(tmp_path / "moe", str(tiny_llama))
    assert r.active_fraction == 1.0
    assert r.expert_oracle_loss == pytest.approx(r.dense_loss, abs=1e-5)
    assert r.neuron_oracle_loss == pytest.approx(r.dense_loss, abs=1e-5)


def test_near_ties_at_a_budget(tiny_llama, tmp_path):
    build(tiny_llama, tmp_path / "moe", method="random", experts=4, top_k=1, router={"kind": "zero"})
    r = api.verify(tmp_path / "moe", str(tiny_llama))
    assert r.active_fraction == 0.25
    assert r.near_tie_fraction == 1.0  # a zero router ties every decision
    build(tiny_llama, tmp_path / "moe2", method="random", experts=4, top_k=1, router={"kind": "random", "std": 1.0})
    sharp = api.verify(tmp_path / "moe2", str(tiny_llama))
    assert sharp.near_tie_fraction < 0.1 and sharp.bf16_flip_fraction < 0.1


def test_near_ties_do_not_depend_on_the_router_scale(tiny_llama, tmp_path):
    """A router's logit scale is free (carve's fitted routers pick ~1e-3): scaling it changes no decision, so it must
    not change how many decisions count as near-tied."""
    from safetensors.torch import load_file, save_file

    build(tiny_llama, tmp_path / "moe", method="random", experts=8, top_k=2, router={"kind": "random", "std": 1.0})
    before = api.verify(tmp_path / "moe", str(tiny_llama))
    weights = tmp_path / "moe" / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1e-3 if k.endswith("mlp.gate.weight") else v for k, v in tensors.items()}, weights,
              metadata={"format": "pt"})
    after = api.verify(tmp_path / "moe", str(tiny_llama))
    assert after.near_tie_fraction == pytest.approx(before.near_tie_fraction, abs=0.01)
    assert after.bf16_flip_fraction == pytest.approx(before.bf16_flip_fraction, abs=0.01)


def test_vllm_check_reads_what_vllm_loads(tiny_llama, tmp_path):
    """Both output formats carry every config field and tensor vLLM's loaders read; a checkpoint missing a q bias,
    or with a head_dim vLLM's Qwen2-MoE would not use, is reported."""
    import json

    from safetensors.torch import load_file, save_file

    from moefy.export.vllm_check import vllm_problems

    build(tiny_llama, tmp_path / "mixtral", method="random", experts=4, top_k=1)
    build(tiny_llama, tmp_path / "qwen", method="random", experts=4, top_k=1, layers="every_other")
    assert json.loads((tmp_path / "qwen" / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    # export-gguf refuses a Qwen2-MoE with dense layers, so its card does not offer it; the Mixtral's does
    assert "export-gguf" not in (tmp_path / "qwen" / "README.md").read_text()
    assert "export-gguf" in (tmp_path / "mixtral" / "README.md").read_text()
    assert vllm_problems(tmp_path / "mixtral") == [] and vllm_problems(tmp_path / "qwen") == []
    assert api.verify(tmp_path / "qwen", str(tiny_llama)).vllm_problems == []

    weights = tmp_path / "qwen" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.q_proj.bias"]
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = tmp_path / "qwen" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "head_dim": config["hidden_size"] // config["num_attention_heads"] * 2}))
    problems = vllm_problems(tmp_path / "qwen")
    assert any("head_dim" in p for p in problems)
    assert any("model.layers.1.self_attn.q_proj.bias" in p for p in problems)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> tuple:
    """A one-layer model whose hidden size (256) a K-quant holds and whose FFN (2,816) splits into 80-wide experts by
    default, with a two-domain calibration corpus."""
    from conftest import make_tiny_llama

    work = tmp_path_factory.mktemp("wide")
    src = make_tiny_llama(work / "model", hidden=256, intermediate=2816, layers=1)
    calib = write_domain_corpus(work / "c.jsonl", {"a": "ab c", "b": "xy z"}, {"a": 6, "b": 6},
                                {"a": 200, "b": 200}, seed=1)
    return src, calib


def test_build_result_carries_the_k_quant_split(wide_llama, tmp_path):
    """Python API users get the suggestion the CLI prints: BuildResult.gguf_split, with the build's active fraction
    beside it; a build that takes it has experts a K-quant holds, and no suggestion."""
    src, calib = wide_llama
    base = {"model": str(src), "method": "carve", "calib": str(calib), "profile": {"tokens_per_domain": 256}}
    result = api.build(BuildRecipe(**base, experts=32, top_k=4), tmp_path / "a")
    assert result.active_fraction == pytest.approx((352 + 4 * 77) / 2816)  # 1/8 shared, 77 real neurons an expert
    split = result.gguf_split
    assert (split.experts, split.top_k, split.expert_size) == (10, 2, 256)
    taken = api.build(BuildRecipe(**base, experts=split.experts, top_k=split.top_k,
                                  shared_fraction=split.shared_fraction(2816)), tmp_path / "b")
    assert taken.plan.meta.expert_size == 256 and taken.gguf_split is None


def test_build_prints_flags_for_experts_a_k_quant_holds(capsys, wide_llama, tmp_path):
    """At a hidden size that is a multiple of 256, a K-quant GGUF runs the experts through llama.cpp's tiled kernel
    only if their width is one too. The build says so and prints the nearest split's flags, and a build with those
    flags has such experts and prints nothing (carve rounds the printed shared fraction back to the same block)."""
    from moefy import cli

    src, calib = wide_llama
    argv = ["build", str(src), "--method", "carve", "--calib", str(calib), "--tokens-per-domain", "256"]
    assert cli.main([*argv, "--out", str(tmp_path / "a"), "--experts", "32", "--top-k", "4"]) == 0
    note = capsys.readouterr().out.split("note: ")[1]
    assert note.startswith("experts of 80 neurons are not a multiple of 256")
    flags = note.split("Rebuild with ")[1].split(" for experts")[0]
    assert flags == "--experts 10 --top-k 2 --shared-fraction 0.0909091"
    assert cli.main([*argv, "--out", str(tmp_path / "b"), *flags.split()]) == 0
    assert "note:" not in capsys.readouterr().out
    plan = load_plan(tmp_path / "b")
    assert (plan.meta.expert_size, plan.meta.shared_size) == (256, 256)
    assert all((lp.experts != PAD).all() and (lp.shared != PAD).all() for lp in plan.layers.values())
