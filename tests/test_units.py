"""Pure pieces: balanced k-means, splits, the streaming writer, plan validation."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moefy.construct.cluster import balanced_assign, balanced_kmeans
from moefy.construct.plan import PAD, LayerPlan, MoEPlan, PlanMeta, balanced_sizes, expert_size_for, pad_groups
from moefy.construct.split import random_split, sequential_split
from moefy.errors import MoefyError
from moefy.host_memory import _glibc, reuse_freed_blocks
from moefy.tensor_writer import ShardedWriter, TensorSpec


def test_balanced_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.standard_normal((64, 4)))[0].T  # 4 orthogonal directions
    truth = np.repeat(np.arange(4), 30)
    points = centres[truth] + 0.05 * rng.standard_normal((120, 64))
    order = rng.permutation(120)
    labels = balanced_kmeans(points[order], [30] * 4, np.random.default_rng(1))
    # Each found cluster is exactly one planted cluster (up to relabelling).
    pairs = {(int(a), int(b)) for a, b in zip(truth[order], labels)}
    assert len(pairs) == 4


def test_balanced_kmeans_exact_uneven_sizes():
    points = np.random.default_rng(0).standard_normal((50, 8))
    sizes = balanced_sizes(50, 8)
    labels = balanced_kmeans(points, sizes, np.random.default_rng(0))
    assert np.bincount(labels, minlength=8).tolist() == sizes


def test_lloyd_running_sums_give_the_recomputed_centroids():
    """Lloyd's phase updates the cluster sums from the rows that change cluster; its centroids must be those that
    recomputing every sum after each assignment gives, however many iterations run, and the sums it hands to the
    balanced rounds (which go on updating them) must be its labels' sums."""
    from moefy.construct.cluster import _kmeans_pp, _lloyd, _sums, _unit_sums

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 32)) * rng.uniform(0.5, 2.0, (600, 1))).astype(np.float32)  # rows of any scale
    inv_norm = 1 / np.linalg.norm(x.astype(np.float64), axis=1)
    start = _kmeans_pp(x, inv_norm, 6, np.random.default_rng(1))
    for iterations in (1, 2, 5, 30):
        reference = start
        for _ in range(iterations):
            labels = np.argmax(x @ reference.T.astype(np.float32), axis=1)
            new = _unit_sums(_sums(x, inv_norm, labels, 6), np.bincount(labels, minlength=6), fallback=reference)
            if np.allclose(new, reference):
                break
            reference = new
        # the sums are float32 matmuls summed in another order: equal to about 1e-8
        centroids, labels, sums = _lloyd(x, inv_norm, start, iterations)
        np.testing.assert_allclose(centroids, reference, rtol=0, atol=1e-6)
        np.testing.assert_allclose(sums, _sums(x, inv_norm, labels, 6), rtol=0, atol=1e-5)


def test_bf16_assignment_gives_the_float32_labels():
    """On a bf16 checkpoint's rows, Lloyd assigns with a bf16 matmul and rescores in float32 the rows whose best
    two scores are within bf16's error. Centroids 1e-4 apart put most rows inside it: the labels must still be
    float32's, and a whole balanced_kmeans on the bf16 tensor must give the labels of its float32 copy.

    "float32's" up to float order: the rescoring is torch's float32 matmul and numpy's sums in another order (its
    OpenBLAS build decides; numpy 2.4.6 with OpenBLAS 0.3.31 split 5 of these 3,000 rows differently from torch),
    so a row may differ from numpy's float32 labels only where its two best exact scores tie to float32 rounding."""
    from moefy.construct.cluster import _nearest

    rng = np.random.default_rng(0)
    xb = torch.from_numpy(rng.standard_normal((3000, 256), dtype=np.float32) * 0.02).bfloat16()
    x = xb.float().numpy()
    inv_norm = 1 / np.linalg.norm(x.astype(np.float64), axis=1)
    base = rng.standard_normal(256)
    centroids = np.stack([base + 1e-4 * rng.standard_normal(256) for _ in range(4)] + [rng.standard_normal(256)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    reference = np.argmax(x @ centroids.T.astype(np.float32), axis=1)
    assert len(np.unique(reference)) == 5  # the near-tied centroids do split the rows
    labels = _nearest(x, inv_norm, centroids, xb)
    differ = np.flatnonzero(labels != reference)
    exact = np.sort(x[differ].astype(np.float64) @ centroids.T, axis=1)
    assert len(differ) <= 10
    assert np.all(exact[:, -1] - exact[:, -2] < 1e-6 * np.linalg.norm(x[differ], axis=1))
    sizes = [600] * 5
    np.testing.assert_array_equal(balanced_kmeans(xb, sizes, np.random.default_rng(3)),
                                  balanced_kmeans(x, sizes, np.random.default_rng(3)))


# Below 256 unassigned points the auction bids one at a time: 40 and 12 points only so, 300 and 1,000 both ways.
@pytest.mark.parametrize("n,sizes", [(40, [14, 13, 13]), (300, [38] * 4 + [37] * 4), (12, [12]),
                                     (1000, [18] * 48 + [17] * 8)])
def test_auction_assignment_is_optimal(n, sizes):
    from scipy.optimize import linear_sum_assignment

    sim = np.random.default_rng(n).standard_normal((n, len(sizes)))
    labels = balanced_assign(sim, sizes)
    assert np.bincount(labels, minlength=len(sizes)).tolist() == sizes
    slots = np.repeat(np.arange(len(sizes)), sizes)
    rows, cols = linear_sum_assignment(-sim[:, slots])
    optimum = sim[rows, slots[cols]].sum()
    assert sim[np.arange(n), labels].sum() >= optimum - n * 1e-6


def test_auction_refuses_sizes_that_do_not_sum_to_the_points():
    """With fewer slots than points the auction would bid for ever."""
    with pytest.raises(ValueError, match="sum to the number of points"):
        balanced_assign(np.zeros((5, 2)), [2, 2])


def test_refine_for_routing_finds_the_partition_a_linear_router_can_serve():
    """Four token clusters a linear router can tell apart, each using its own quarter of the neurons: from a random
    balanced start, the refinement gives each expert one cluster's neurons, and the routed experts then cover
    nearly all of each token's activation mass."""
    from moefy.construct.methods import linear_routing, refine_for_routing, ridge_scores, routed_mass

    rng = np.random.default_rng(0)
    cluster = rng.integers(0, 4, 400)
    hidden = np.eye(8)[cluster] + 0.1 * rng.standard_normal((400, 8))
    owner = np.arange(40) % 4  # neuron j fires on cluster j % 4's tokens
    abs_act = np.where(cluster[:, None] == owner[None], 1.0, 0.05) * rng.uniform(0.5, 1.5, (400, 40))
    start = rng.permutation(np.repeat(np.arange(4), 10))

    def coverage(labels):
        mass = routed_mass(abs_act, labels, 4)
        return (mass * linear_routing(ridge_scores(hidden, 1e-2), mass, 1)).sum() / abs_act.sum()

    labels = refine_for_routing(start, abs_act, hidden, [10] * 4, top_k=1, rounds=4, ridge=1e-2)
    assert np.bincount(labels, minlength=4).tolist() == [10] * 4
    assert len({(int(o), int(e)) for o, e in zip(owner, labels)}) == 4  # each expert is one cluster's neurons
    assert coverage(labels) > 0.8 > coverage(start)
    assert (refine_for_routing(start, abs_act, hidden, [10] * 4, 1, 0, 1e-2) == start).all()


def test_carve_output_measure_weighs_each_neuron_by_its_down_norm():
    """cluster.measure = output scales each neuron's |a| by its down-projection column norm: a norm common to all
    neurons changes no decision (clustering normalises per token, refinement standardises); different norms move
    neurons between experts, but not into or out of the shared block, which is chosen by how often a neuron fires."""
    from moefy.construct.methods import carve_split
    from moefy.construct.recipe import BuildRecipe

    g = torch.Generator().manual_seed(0)
    stats = {"top_freq": torch.rand(2, 96, generator=g), "domain_tokens": torch.tensor([10.0, 30.0]),
             "abs_act": torch.randn(300, 96, generator=g).abs() ** 3, "hidden": torch.randn(300, 16, generator=g)}
    recipe = BuildRecipe(model="m", method="carve", experts=6, top_k=2, shared_fraction=0.125)

    def labels(norms):
        groups, shared = carve_split(stats, recipe, np.random.default_rng(0), norms)
        return [g.tolist() for g in groups], shared.tolist()

    plain = labels(None)
    assert labels(torch.full((96,), 3.0)) == plain
    norms = torch.rand(96, generator=g) + 0.5
    weighted = labels(norms)
    assert weighted[1] == plain[1] and weighted != plain  # the shared block is chosen by frequency, as before


@pytest.mark.parametrize("tokens", [50, 12])  # more tokens than inputs (primal form), fewer (dual form)
def test_ridge_scores_are_the_ridge_fit(tokens):
    """ridge_scores, solved once per layer, gives the fitted values of the plain normal-equations solve, in either
    form."""
    from moefy.construct.methods import ridge_scores

    rng = np.random.default_rng(0)
    hidden, target = rng.standard_normal((tokens, 20)) * rng.uniform(0.1, 3, 20), rng.standard_normal((tokens, 5))
    gram = hidden.T @ hidden
    want = hidden @ np.linalg.solve(gram + 0.1 * np.diag(gram).mean() * np.eye(20), hidden.T @ target)
    np.testing.assert_allclose(ridge_scores(hidden, 0.1)(target), want, rtol=1e-9, atol=1e-9)


def test_splits_partition():
    assert balanced_sizes(10, 3) == [4, 3, 3]
    r = random_split(10, 3, np.random.default_rng(0))
    s = sequential_split(10, 3)
    assert sorted(np.concatenate(r).tolist()) == list(range(10))
    assert [g.tolist() for g in s] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert expert_size_for(1536, 8) == 192 and expert_size_for(1536, 7) == 224 and expert_size_for(50, 8) == 8


def test_writer_shards_and_index(tmp_path):
    tensors = {f"t{i}": torch.randn(64, 32) for i in range(5)}  # 8 KiB each
    tensors["half"] = torch.randn(3, 5).to(torch.bfloat16)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, max_bytes=20_000)
    for n, t in tensors.items():
        writer.write(n, t)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    loaded = {}
    for f in set(index["weight_map"].values()):
        loaded.update(load_file(str(tmp_path / f)))
    for n, t in tensors.items():
        assert torch.equal(loaded[n], t)


def test_writer_rejects_out_of_order(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorSpec("a", (2,), torch.float32)], 1024)
    with pytest.raises(RuntimeError):
        writer.write("b", torch.zeros(2))


def _plan(experts: np.ndarray, coverage="partition") -> MoEPlan:
    meta = PlanMeta(source="x", family="llama", method="random", num_layers=1, num_experts=experts.shape[0],
                    top_k=1, ffn_width=6, hidden_size=4, expert_size=experts.shape[1], moe_layers=[0], scales=[1.0],
                    coverage=coverage)
    return MoEPlan(meta, {0: LayerPlan(experts, torch.zeros(experts.shape[0], 4), 1.0)})


def test_plan_validation():
    _plan(pad_groups([np.array([0, 1, 2]), np.array([3, 4, 5])], 4)).validate()
    with pytest.raises(MoefyError, match="outside"):
        _plan(np.array([[0, 1, 2], [3, 4, 9]])).validate()
    with pytest.raises(MoefyError, match="exactly one expert"):
        _plan(np.array([[0, 1, 2], [2, 3, 4]])).validate()
    with pytest.raises(MoefyError, match="twice"):
        _plan(np.array([[0, 0, 1], [2, 3, 4]]), coverage="overlap").validate()
    _plan(np.array([[0, 1, 2], [2, 3, 4]]), coverage="overlap").validate()
    assert PAD == -1


def test_recipe_method_names_match_the_registry():
    from moefy.construct.recipe import METHOD_NAMES
    from moefy.construct.registry import METHODS

    assert set(METHOD_NAMES) == set(METHODS)


def test_every_build_recipe_field_has_a_generated_flag():
    """cli's build flags come from BuildRecipe itself: each field and each section's field has one (the model is
    the positional argument), and the flags given become a nested override of exactly those fields."""
    from pydantic import BaseModel

    from moefy.cli import _build_parser
    from moefy.construct.recipe import BuildRecipe
    from moefy.recipe_flags import PREFIX, recipe_overrides

    def leaves(model, path=()):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from leaves(field.annotation, (*path, name))
            else:
                yield ".".join((*path, name))

    build = _build_parser()._subparsers._group_actions[0].choices["build"]
    dests = {a.dest[len(PREFIX):] for a in build._actions if a.dest.startswith(PREFIX)}
    assert dests == set(leaves(BuildRecipe)) - {"model"}
    args = _build_parser().parse_args(["build", "m", "--reconstruct-steps", "7", "--no-reconstruct", "--layers",
                                       "0,2", "--dive-affinity", "iou", "--tokens-per-domain", "64"])
    assert recipe_overrides(args) == {"reconstruct": {"steps": 7, "enabled": False}, "layers": "0,2",
                                      "dive": {"affinity": "iou"}, "profile": {"tokens_per_domain": 64}}


def test_train_flags_set_every_stage_or_make_the_one_stage(tmp_path):
    """train's flags come from TrainRecipe and Stage: stage flags set every stage of a recipe (a preset's too),
    `--distill` turns the off-by-default section on, and without a recipe the stage flags are the one stage."""
    import yaml

    from moefy.cli import _build_parser
    from moefy.errors import MoefyError
    from moefy.recipe_flags import recipe_overrides
    from moefy.train.recipe import Distill, load_train_recipe

    def recipe(source, *flags):
        return load_train_recipe(source, recipe_overrides(_build_parser().parse_args(["train", "m", *flags])))

    r = recipe(None, "--tokens", "4096", "--trainable", "experts-lora", "--lora-rank", "4", "--distill",
               "--mixture-preset", "custom", "--mixture-weights", "a=1,b=3", "--seed", "7", "--reconstruct")
    (stage,) = r.stages
    assert (stage.tokens, stage.trainable, stage.lora.rank, stage.lora.alpha) == (4096, "experts-lora", 4, 16.0)
    assert stage.distill == Distill() and stage.mixture.weights == {"a": 1.0, "b": 3.0}
    assert r.seed == 7 and r.reconstruct.enabled
    assert recipe(None, "--tokens", "4096", "--distill-temperature", "2").stages[0].distill.temperature == 2.0
    dive = recipe("dive", "--seq-len", "64")
    assert [s.seq_len for s in dive.stages] == [64, 64, 64]
    assert [s.lr for s in dive.stages] == [s.lr for s in load_train_recipe("dive").stages]  # the rest: the preset's
    yml = tmp_path / "r.yaml"
    yml.write_text(yaml.safe_dump({"stages": [{"tokens": 2048, "lr": 0.1, "distill": {"temperature": 3.0}},
                                              {"tokens": 1024}]}))
    two = recipe(yml, "--lr", "0.01", "--distill-lm-weight", "0.5")
    assert [s.lr for s in two.stages] == [0.01, 0.01]
    assert (two.stages[0].distill.temperature, two.stages[0].distill.lm_weight) == (3.0, 0.5)  # merged, not replaced
    assert recipe(yml) == load_train_recipe(yml)  # no flag given: the file as it is
    with pytest.raises(MoefyError, match="train needs --recipe .* or --tokens"):
        recipe(None, "--lr", "0.01")
    with pytest.raises(MoefyError, match="token budget 100 is smaller than one optimizer step"):
        recipe(None, "--tokens", "100")


def test_filter_flags_come_from_the_filter_recipe():
    """Optional sections, list and dict fields get flags too: `--fluency none` switches a scorer off, `--domains`
    is a comma list and `--drop-quantile` KEY=NUMBER pairs, and each lands on its recipe field."""
    from moefy.cli import _build_parser
    from moefy.data.filtering import FilterRecipe
    from moefy.recipe_flags import recipe_overrides
    from moefy.recipes import load_recipe

    def recipe(*flags):
        args = _build_parser().parse_args(["data", "filter", "c.jsonl", "--out", "o", *flags])
        return load_recipe(FilterRecipe, None, recipe_overrides(args))

    r = recipe("--fluency", "none", "--domains", "cc, web", "--threshold", "ads=0.7", "--text-field", "body")
    assert r.fluency is None and r.domains == ["cc", "web"] and r.threshold == {"ads": 0.7}
    assert r.drop_quantile == {} and r.text_field == "body"  # fluency off: no default fluency cut
    r = recipe("--fluency", "m", "--cache", "c", "--fluency-max-tokens", "64", "--ads", "none",
               "--drop-quantile", "fluency=0.2")
    assert (r.fluency.model, r.fluency.cache, r.fluency.max_tokens) == ("m", "c", 64)
    assert r.ads is None and r.drop_quantile == {"fluency": 0.2} and r.threshold == {}
    assert recipe() == FilterRecipe()  # no flag given: the recipe's defaults


def _meta(ffn: int, hidden: int, shared: int, experts: int, top_k: int, method: str = "carve") -> PlanMeta:
    size = expert_size_for(ffn - shared, experts)
    return PlanMeta(source="x", family="llama", method=method, num_layers=1, num_experts=experts, top_k=top_k,
                    ffn_width=ffn, hidden_size=hidden, expert_size=size, moe_layers=[0], scales=[1.0],
                    shared_size=shared)


@pytest.mark.parametrize("ffn,hidden,shared,experts,top_k,method,want", [
    # carve's 56-expert 25% split on the width bench's 2048 / 8192 shape -> make demo's structure, which tiles
    (8192, 2048, 1024, 56, 8, "carve", (28, 4, 1024, 0.25)),
    # LLaMA-2-7B: 11,008 = 43 × 256 has no split at exactly 25%; the nearest keeps the shared block nearest 1/8
    (11008, 4096, 1376, 56, 8, "carve", (38, 6, 1280, 11 / 43)),
    # no shared block to give: every neuron in a routed expert
    (11008, 4096, 0, 16, 4, "random", (43, 11, 0, 11 / 43)),
])
def test_tiled_split_is_the_nearest_split_with_256_wide_experts(ffn, hidden, shared, experts, top_k, method, want):
    from moefy.export.to_gguf import tiled_split

    meta = _meta(ffn, hidden, shared, experts, top_k, method)
    split = tiled_split(meta, (shared + top_k * (ffn - shared) / experts) / ffn)
    assert (split.experts, split.top_k, split.shared, split.active) == pytest.approx(want)
    assert split.expert_size == 256 and split.shared + split.experts * split.expert_size == ffn


@pytest.mark.parametrize("meta", [
    _meta(8192, 2048, 1024, 28, 4),  # already 256 wide
    _meta(1536, 576, 192, 56, 8),  # SmolLM2: hidden 576 keeps gate and up untiled whatever the split
    _meta(8192, 2048, 0, 6, 1, "dive"),  # pruned FFNs (1,368 wide, so only the method keeps it quiet)
    _meta(8192, 2048, 1024, 6, 2, "importance"),  # one expert per calibration domain
    _meta(8000, 2048, 0, 16, 4, "random"),  # no shared block to take the 8000 % 256 left over
])
def test_tiled_split_stays_quiet_where_no_flags_help(meta):
    from moefy.export.to_gguf import tiled_split

    assert tiled_split(meta, 0.25) is None


def test_exportable_asks_what_export_gguf_refuses():
    """The build's card offers export-gguf only where it would not refuse: the same config checks, not a copy."""
    from moefy.export.to_gguf import exportable, granite_config

    qwen = {"model_type": "qwen2_moe", "norm_topk_prob": True, "num_attention_heads": 4, "hidden_size": 32}
    assert exportable({"model_type": "mixtral"}) and exportable(qwen)
    assert not exportable({"model_type": "phi"})
    for refused in ({"mlp_only_layers": [1]}, {"use_sliding_window": True}, {"head_dim": 16}):
        assert not exportable({**qwen, **refused})
        with pytest.raises(MoefyError, match="cannot export this Qwen2-MoE output to GGUF exactly"):
            granite_config({**qwen, **refused})


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(_glibc() is None or not hasattr(_glibc(), "mallinfo2"), reason="glibc 2.33+ allocator only")
def test_reuse_freed_blocks_serves_large_blocks_from_the_heap_and_keeps_them():
    # What the block changes in glibc, observed through mallinfo2. How many page faults that saves depends on the
    # heap's fragmentation, so the benchmark measures it (bench_train_memory.py's page-fault column).
    libc = _glibc()
    libc.mallinfo2.restype = _MallInfo2

    def mapped_and_kept(mib: int) -> tuple[int, bool]:
        """(blocks glibc mmapped for a new tensor of `mib` MiB, whether the heap kept its size once it is freed)"""
        before = libc.mallinfo2().hblks
        tensor = torch.empty(mib * 2**18)
        mapped, heap = libc.mallinfo2().hblks - before, libc.mallinfo2().arena
        del tensor
        return mapped, libc.mallinfo2().arena >= heap

    # Outside, 2 GiB (virtual: torch.empty touches no page): more than the whole test run frees into the heap
    # (glibc takes a large enough free block from the heap whatever the setting; the largest the tests allocate
    # inside the block are SmolLM2's logits, 0.4 GB), and above glibc's largest mmap threshold (32 MiB).
    assert mapped_and_kept(2048)[0] == 1  # glibc's default: mapped fresh, unmapped when freed
    with reuse_freed_blocks():
        with reuse_freed_blocks():
            assert mapped_and_kept(64) == (0, True)  # from the heap, and kept there when freed
        assert mapped_and_kept(64) == (0, True)  # the inner block's exit left the outer one's setting
    assert mapped_and_kept(2048)[0] == 1  # the defaults are back
