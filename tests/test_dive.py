"""DIVE: neuron scores, affinity, grouping and reconstruction on tiny models, labelled and unlabelled corpora."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_domain_corpus

from moefy import api, cli
from moefy.construct.dive import (
    group_domains,
    group_moments,
    keep_top,
    loss_affinity,
    mask_iou,
    neuron_scores,
    overlap_stats,
)
from moefy.construct.recipe import BuildRecipe
from moefy.recipes import validate_recipe

# two pairs of similar alphabets and one outlier: the grouping should find the pairs
ALPHABETS = {"ab": "ab ", "abc": "abc ", "digits": "0123 ", "digits2": "01234 ", "punct": "!?.,; "}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_domain_corpus(tmp_path_factory.mktemp("dive") / "c.jsonl", ALPHABETS, {k: 6 for k in ALPHABETS},
                               {k: 300 for k in ALPHABETS}, seed=1)


def dive_recipe(model, calib, **fields):
    return validate_recipe(BuildRecipe, {"model": str(model), "method": "dive", "calib": str(calib),
                                         "profile": {"tokens_per_domain": 512, "seq_len": 64},
                                         "dive": {"affinity_tokens_per_domain": 128, **fields.pop("dive", {})},
                                         **fields})


def test_group_moments_are_the_mixed_data_moments():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 2, (300, 5)), rng.normal(-1, 1, (100, 5))
    stats = {"mean": torch.tensor(np.stack([a.mean(0), b.mean(0)])),
             "sq_mean": torch.tensor(np.stack([(a ** 2).mean(0), (b ** 2).mean(0)])),
             "domain_tokens": torch.tensor([300.0, 100.0])}
    both = np.concatenate([a, b])
    m = group_moments(stats, [0, 1])
    np.testing.assert_allclose(m["sq_mean"] - m["mean"] ** 2, both.var(0), rtol=1e-10)
    w_down = torch.tensor(rng.normal(size=(3, 5)))
    flap = neuron_scores(m, w_down, "flap")
    np.testing.assert_allclose(flap, both.var(0) * (w_down.numpy() ** 2).sum(0), rtol=1e-10)
    wanda = neuron_scores(m, w_down, "wanda")
    np.testing.assert_allclose(wanda, np.sqrt((both ** 2).mean(0)) * np.abs(w_down.numpy()).sum(0), rtol=1e-10)
    assert list(keep_top(torch.tensor([0.1, 5.0, 3.0, 3.0, 0.0]), 0.6)) == [1, 2, 3]


def test_affinity_and_grouping():
    masks = [[np.array([0, 1, 2, 3]), np.array([0, 1, 2, 4]), np.array([5, 6, 7, 8])]]
    iou = mask_iou(masks, 10)
    assert iou[0, 1] == pytest.approx(3 / 5) and iou[0, 2] == 0 and np.allclose(np.diag(iou), 1)
    losses = np.array([[2.0, 2.2, 5.0], [2.1, 2.0, 5.0], [6.0, 6.0, 3.0]])
    aff = loss_affinity(losses)
    assert np.allclose(aff, aff.T) and np.allclose(np.diag(aff), 1) and aff[0, 1] > aff[0, 2]
    assert group_domains(aff, 2) == [[0, 1], [2]]
    assert group_domains(aff, 3) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="cannot make 4 groups from 3 domains"):
        group_domains(aff, 4)
    stats = overlap_stats([np.array([0, 1]), np.array([1, 2])], 4)
    assert stats == {"mean_pairwise_iou": pytest.approx(1 / 3), "uncovered": 0.25, "in_one": 0.5, "in_all": 0.25}


def test_dive_build_labelled(tiny_llama, labelled, tmp_path):
    from transformers import MixtralForCausalLM

    result = api.build(dive_recipe(tiny_llama, labelled, experts=3, top_k=1), tmp_path / "moe")
    meta = result.plan.meta
    assert meta.method == "dive" and meta.coverage == "overlap" and meta.scales == [1.0, 1.0]
    mining = json.loads((tmp_path / "moe" / "dive" / "mining.json").read_text())
    assert sorted(sum(mining["groups"], [])) == sorted(ALPHABETS)  # every domain in exactly one group
    assert meta.domain_groups == mining["groups"] and len(mining["groups"]) == 3
    assert {"dense", "pruned", "pruned_with_bias"} <= set(mining["bias_compensation"]["punct"])
    aff = np.array(mining["affinity"])
    assert np.allclose(aff, aff.T) and aff.shape == (5, 5)
    assert 0 < mining["expert_overlap"]["mean"]["mean_pairwise_iou"] < 1
    for png in ("affinity.png", "dendrogram.png"):
        assert (tmp_path / "moe" / "dive" / png).stat().st_size > 5000
    saved = (tmp_path / "moe" / "moefy.yaml").read_text()
    assert "keep: 0.333" in saved and "kind: domain" in saved  # the resolved defaults
    # Each expert alone (top-1 forced) equals the dense model restricted to that expert's neurons.
    report = api.verify(tmp_path / "moe", str(tiny_llama))
    assert report.check == "per-expert" and report.passed
    assert isinstance(MixtralForCausalLM.from_pretrained(tmp_path / "moe"), MixtralForCausalLM)


def test_dive_router_rows_are_group_centroids(tiny_llama, labelled, tmp_path):
    result = api.build(dive_recipe(tiny_llama, labelled, experts=5, top_k=1, dive={"affinity": "iou"}), tmp_path / "m")
    groups = result.plan.meta.domain_groups
    assert sorted(len(g) for g in groups) == [1] * 5
    assert result.plan.layers[0].router.shape == (5, 32) and result.plan.layers[0].router.abs().sum() > 0


def test_dive_unlabelled_discovers_domains(tiny_llama, tmp_path):
    mixed = tmp_path / "plain.jsonl"
    write_domain_corpus(mixed, {"x": "ab ", "y": "0123 "}, {"x": 6, "y": 6}, {"x": 300, "y": 300}, seed=3)
    lines = [json.loads(line) for line in mixed.read_text().splitlines()]
    mixed.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in lines))  # labels removed
    api.build(dive_recipe(tiny_llama, mixed, experts=2, top_k=1), tmp_path / "moe")
    mining = json.loads((tmp_path / "moe" / "dive" / "mining.json").read_text())
    discovery = mining["discovery"]
    assert discovery["pseudo_domains"] == 2 and set(discovery["assignment"]) == {"pseudo-0", "pseudo-1"}
    # the two alphabets were told apart by the model's own hidden states
    truth = [r["domain"] for r in lines]
    pairs = set(zip(truth, discovery["assignment"]))
    assert len(pairs) == 2
    for cluster in discovery["clusters"].values():
        assert cluster["documents"] == 6 and cluster["typical_documents"] and cluster["typical_tokens"]


def test_dive_splits_domains_when_fewer_than_experts(tiny_llama, tmp_path):
    calib = write_domain_corpus(tmp_path / "c.jsonl", {"x": "ab ", "y": "0123 "}, {"x": 8, "y": 4},
                                {"x": 300, "y": 300}, seed=4)
    result = api.build(dive_recipe(tiny_llama, calib, experts=3, top_k=1, dive={"affinity": "iou"}), tmp_path / "m")
    mining = json.loads((tmp_path / "m" / "dive" / "mining.json").read_text())
    assert set(mining["discovery"]["split"]) == {"x.0", "x.1"}  # the largest domain was split
    assert sorted(sum(result.plan.meta.domain_groups, [])) == ["x.0", "x.1", "y"]


def test_dive_errors(capsys, tiny_llama, labelled, tmp_path):
    assert cli.main(["build", str(tiny_llama), "--method", "dive", "--out", str(tmp_path / "a")]) == 2
    assert "dive prunes on calibration domains: pass --calib" in capsys.readouterr().err
    assert cli.main(["build", str(tiny_llama), "--method", "dive", "--calib", str(labelled), "--keep", "0",
                     "--out", str(tmp_path / "b")]) == 2
    assert "keep: Input should be greater than 0" in capsys.readouterr().err
    assert cli.main(["build", str(tiny_llama), "--method", "dive", "--calib", str(labelled), "--discover-domains",
                     "99", "--tokens-per-domain", "256", "--out", str(tmp_path / "c")]) == 2
    assert "dive: cannot make 99 clusters from 30 documents" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")


def test_dive_preset_trains_a_dive_moe(tiny_llama, labelled, tmp_path):
    """`moefy train --recipe dive` with its stage budgets as recipe fields: soft-routed routers, then LoRA."""
    import yaml

    api.build(dive_recipe(tiny_llama, labelled, experts=3, top_k=1, dive={"affinity": "iou"}), tmp_path / "moe")
    recipe = tmp_path / "dive.yaml"
    recipe.write_text(yaml.safe_dump({"preset": "dive", "tokens": [2 * 4 * 32, 3 * 4 * 32, 4 * 32],
                                      "seq_len": 32, "checkpoint_every": 100}))
    final = api.train(tmp_path / "moe", str(labelled), recipe, tmp_path / "run")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == ["dive-0-router-soft"] * 2 + ["dive-1-lora"] * 3 + ["dive-2-lora-low-lr"]
    saved = (tmp_path / "run" / "moefy_train.yaml").read_text()
    assert "soft_temperature: 1.0" in saved and "experts-lora" in saved  # the expanded stages are what was saved
    assert (final / "config.json").is_file() and (final / "moefy_plan.json").is_file()


def test_sliced_pruning_equals_masked_activations(tiny_llama):
    """`pruned` slices the FFN to the kept neurons (the speed-up) instead of masking activations (the definition):
    the same logits, with and without FLAP's bias compensation, and the dense weights are back afterwards."""
    from moefy.construct.dive_mining import pruned
    from moefy.models import load_causal_lm

    model = load_causal_lm(tiny_llama)
    width = model.model.layers[0].mlp.down_proj.in_features
    rng = np.random.default_rng(0)
    kept = {i: np.sort(rng.choice(width, width // 4, replace=False)) for i in range(len(model.model.layers))}
    fill = {i: torch.randn(width) for i in kept}
    ids = torch.randint(0, 200, (2, 16))
    dense = model(input_ids=ids).logits

    def masked(compensate: bool) -> torch.Tensor:
        hooks = []
        for i, idx in kept.items():
            mask = torch.zeros(width, dtype=torch.bool)
            mask[torch.from_numpy(idx)] = True
            const = torch.where(mask, 0.0, fill[i]) if compensate else torch.zeros(width)
            hooks.append(model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
                lambda m, args, mask=mask, const=const: (args[0] * mask + const,)))
        out = model(input_ids=ids).logits
        for h in hooks:
            h.remove()
        return out

    for compensate in (False, True):
        with torch.no_grad(), pruned(model, kept, fill if compensate else None):
            sliced = model(input_ids=ids).logits
        torch.testing.assert_close(sliced, masked(compensate), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(input_ids=ids).logits, dense)
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] == width


def test_batched_embeddings_equal_one_by_one(tiny_llama):
    from moefy.construct.domains import embed_documents
    from moefy.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(tiny_llama), load_tokenizer(tiny_llama)
    texts = ["ab ab", "0123 0123 0123 0123 01", "!?", "abc abc abc"]
    batched = embed_documents(model, tok, texts, 64, batch_size=4)
    single = np.concatenate([embed_documents(model, tok, [t], 64, batch_size=1) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_split_embeds_only_the_domains_it_splits():
    from moefy.construct.domains import split_largest

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 1, (6, 4)), rng.normal(5, 1, (6, 4)), rng.normal(-5, 1, (3, 4))])
    labels = ["big"] * 12 + ["small"] * 3
    asked: list[int] = []

    def embed(indices):
        asked.extend(indices)
        return points[indices]

    new, origin = split_largest(labels, embed, 3, seed=0)
    assert set(asked) == set(range(12))  # never the small domain's documents
    assert set(new[:12]) == {"big.0", "big.1"} and new[12:] == ["small"] * 3 and origin == {"big.0": "big",
                                                                                              "big.1": "big"}
    assert len(set(new[:6])) == 1 and len(set(new[6:12])) == 1  # the two clumps
