"""moefy eval (perplexity, speed) and moefy analyze (routing stats, plots, HTML report) on tiny models."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from moefy import api, cli
from moefy.profile.perplexity import heldout_perplexity, same_width_batches, windows
from moefy.errors import MoefyError
from conftest import write_domain_corpus

DOMAINS = {"alpha": "abcdefgh ", "digits": "0123456789 ", "punct": "!?.,;:-+ "}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return write_domain_corpus(tmp_path_factory.mktemp("held") / "held.jsonl", DOMAINS, dict.fromkeys(DOMAINS, 6),
                               dict.fromkeys(DOMAINS, 100), seed=1)


@pytest.mark.parametrize("n,seq_len,stride", [(100, 16, 15), (100, 16, 5), (17, 16, 4), (40, 16, 1), (16, 16, 15)])
def test_sliding_windows_score_every_token_once(n, seq_len, stride):
    scored = []
    for start, end, first in windows(n, seq_len, stride):
        assert end - start <= seq_len
        scored += list(range(start + max(first, 1), end))
    assert sorted(scored) == list(range(1, n))


def test_perplexity_matches_a_direct_computation(tiny_llama, heldout):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moefy.data.corpus import load_corpus
    from moefy.data.tokens import stream

    result = api.evaluate([str(tiny_llama)], str(heldout), seq_len=32, tokens_per_domain=256)
    ppl = result.perplexity[str(tiny_llama)]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = stream(load_corpus(heldout).by_domain()["digits"], AutoTokenizer.from_pretrained(tiny_llama), 256)
    losses = []
    with torch.no_grad():  # windows of 32 that share one token: every token after the first scored once
        for s in range(0, len(ids) - 1, 31):
            chunk = ids[s:s + 32]
            logits = model(input_ids=chunk[None]).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits[:-1], chunk[1:], reduction="none"))
    expected = torch.cat(losses).mean().item()
    assert abs(ppl.per_domain["digits"] - expected) < 1e-4
    # overlapping windows (more context per token) give a different, still finite, number
    strided = api.evaluate([str(tiny_llama)], str(heldout), seq_len=32, stride=8, tokens_per_domain=256)
    assert strided.perplexity[str(tiny_llama)].tokens == ppl.tokens


def test_perplexity_computes_no_padding(tiny_llama, heldout):
    """The stream's short last window runs on its own: every position a forward computes belongs to a window, and
    the loss is the one of batches padded to the full context (causal: padding at the end changes nothing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moefy.data.corpus import load_corpus

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    corpus = load_corpus(heldout)
    computed = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: computed.append(kw["input_ids"].numel()),
                                           with_kwargs=True)
    ppl = heldout_perplexity(model, tok, corpus, seq_len=32, tokens_per_domain=70, batch_size=8)
    hook.remove()
    spans = windows(70, 32, 31)  # widths 32, 32, 8
    assert [e - s for s, e, _ in spans] == [32, 32, 8]
    assert sum(computed) == len(corpus.by_domain()) * 72  # padded to 32 each it was 96
    with torch.no_grad():  # the same windows, padded to the full width in one batch, as before
        from moefy.data.tokens import stream

        ids = stream(corpus.by_domain()["digits"], tok, 70)
        batch = torch.stack([torch.nn.functional.pad(ids[s:e], (0, 32 - (e - s))) for s, e, _ in spans])
        logits = model(input_ids=batch).logits
        nll = sum(torch.nn.functional.cross_entropy(logits[r, max(f - 1, 0):e - s - 1], ids[s + 1 + max(f - 1, 0):e],
                                                    reduction="sum").item() for r, (s, e, f) in enumerate(spans))
    assert abs(ppl.per_domain["digits"] - nll / 69) < 1e-5


@pytest.mark.parametrize("widths,size,expected", [([4, 4, 4, 2], 8, [3, 1]), ([4, 4, 4, 4, 4], 2, [2, 2, 1]),
                                                  ([4], 8, [1]), ([4, 4, 1], 1, [1, 1, 1])])
def test_same_width_batches(widths, size, expected):
    spans = [(0, w, 0) for w in widths]
    batches = same_width_batches(spans, size)
    assert [len(b) for b in batches] == expected and sum(batches, []) == spans
    assert all(len({e - s for s, e, _ in b}) == 1 for b in batches)


def test_eval_cli_side_by_side_with_speed(capsys, tiny_llama, tiny_moe, heldout, tmp_path):
    code = cli.main(["eval", str(tiny_llama), str(tiny_moe), "--data", str(heldout), "--seq-len", "32",
                     "--tokens-per-domain", "128", "--speed", "--json", str(tmp_path / "e.json")])
    assert code == 0
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data["perplexity"]) == {str(tiny_llama), str(tiny_moe)}
    assert set(data["perplexity"][str(tiny_moe)]["ppl"]) == set(DOMAINS)
    moe_speed, dense_speed = data["speed"][str(tiny_moe)], data["speed"][str(tiny_llama)]
    assert moe_speed["active_params"] < moe_speed["total_params"]
    assert dense_speed["active_params"] == dense_speed["total_params"]
    assert all(moe_speed[f"{rate}_tokens_per_s"] > 0 for rate in ("forward", "prefill", "generate"))
    assert dense_speed["prefill_x_baseline"] == 1.0


@pytest.mark.parametrize("speed", [False, True])
def test_eval_holds_one_model_at_a_time_unless_it_times_them(monkeypatch, tiny_llama, tiny_moe, heldout, speed):
    """Perplexity alone frees each model before the next loads; --speed times them side by side, so keeps them."""
    import weakref

    from moefy.evaluate import compare

    alive, load = [], compare._load_for_eval

    def tracked(*args, **kwargs):
        model, tok = load(*args, **kwargs)
        alive.append([r() is not None for r in refs])  # the models loaded before this one, as this one loads
        refs.append(weakref.ref(model))
        return model, tok

    refs: list = []
    monkeypatch.setattr(compare, "_load_for_eval", tracked)
    api.evaluate([str(tiny_llama), str(tiny_moe)], str(heldout), seq_len=32, tokens_per_domain=64, speed=speed)
    assert alive == [[], [speed]]


def test_eval_reads_a_bf16_build_as_float32_in_its_stored_dtype(monkeypatch, tiny_llama, heldout, tmp_path):
    """Where memory is short, perplexity of a bf16 build is that of the same model loaded in float32, exactly, with
    its weights kept in bf16: half the memory of float32 for a 7B model. Timed (--speed), it is a float32 model, as
    users run it, and so is a model whose float32 copy fits."""
    from moefy import models
    from moefy.construct.recipe import BuildRecipe
    from moefy.evaluate import compare

    bf16 = tmp_path / "bf16"
    api.build(BuildRecipe(model=str(tiny_llama), experts=4, top_k=2, method="random", dtype="bfloat16"), bf16)
    float32 = tmp_path / "float32"
    shutil.copytree(bf16, float32)
    config = json.loads((float32 / "config.json").read_text())
    (float32 / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))  # transformers upcasts the load
    dtypes, load = [], compare._load_for_eval

    def tracked(*args, **kwargs):
        model, tok = load(*args, **kwargs)
        dtypes.append({p.dtype for p in model.parameters()})
        return model, tok

    monkeypatch.setattr(compare, "_load_for_eval", tracked)
    api.evaluate([str(bf16)], str(heldout), seq_len=32, tokens_per_domain=64)
    assert dtypes == [{torch.float32}]  # this machine holds the tiny model in float32
    monkeypatch.setattr(models, "free_memory", lambda device: 0)
    losses = api.evaluate([str(bf16), str(float32)], str(heldout), seq_len=32, tokens_per_domain=64).perplexity
    assert dtypes[1:] == [{torch.bfloat16}, {torch.float32}]
    assert losses[str(bf16)].overall_loss == losses[str(float32)].overall_loss
    api.evaluate([str(bf16)], str(heldout), seq_len=32, tokens_per_domain=64, speed=True)
    assert dtypes[-1] == {torch.float32}


def test_eval_oracles_where_memory_is_short_are_those_of_the_float32_models(monkeypatch, tiny_llama, heldout,
                                                                             tmp_path):
    """--oracle where memory is short: the dense source and the build both stay bf16 and are read as float32
    (the oracles' hooks run on them so), and every number is the one their float32 copies give."""
    from transformers import AutoModelForCausalLM

    from moefy import models
    from moefy.construct.recipe import BuildRecipe

    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(dense)
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy(f, dense / f.name)
    moe = tmp_path / "moe"
    api.build(BuildRecipe(model=str(dense), experts=4, top_k=1, method="cluster"), moe)
    held = []
    loaded = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: held.append(loaded(*a, **k)) or held[-1])

    def evaluated() -> tuple[list[float], list[set]]:
        held.clear()
        result = api.evaluate([str(moe)], str(heldout), seq_len=32, tokens_per_domain=64, oracle=True)
        oracles = result.oracles[str(moe)]
        return ([result.perplexity[str(moe)].overall_loss]
                + [getattr(oracles, o).overall_loss for o in ("expert", "neuron", "routing")],
                [{p.dtype for p in model.parameters()} for model in held])

    upcast, upcast_dtypes = evaluated()
    monkeypatch.setattr(models, "free_memory", lambda device: 0)
    kept, kept_dtypes = evaluated()
    # the MoE, then its dense source for the oracles
    assert (upcast_dtypes, kept_dtypes) == ([{torch.float32}] * 2, [{torch.bfloat16}] * 2)
    assert kept == upcast


def test_eval_runs_the_moes_with_the_experts_kernel_asked_for(monkeypatch, tiny_llama, tiny_moe, heldout, tmp_path):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    kernel = ALL_EXPERTS_FUNCTIONS["batched_mm"]
    calls = []

    def spy(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return kernel(module, *args, **kwargs)

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "batched_mm", spy)
    default = api.evaluate([str(tiny_moe)], str(heldout), seq_len=32, tokens_per_domain=128)
    assert not calls and default.experts_implementation is None
    code = cli.main(["eval", str(tiny_llama), str(tiny_moe), "--data", str(heldout), "--seq-len", "32",
                     "--tokens-per-domain", "128", "--experts-impl", "batched_mm", "--json", str(tmp_path / "e.json")])
    assert code == 0 and calls  # the MoE's experts ran through the kernel asked for; the dense model has none
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["experts_implementation"] == "batched_mm"
    # another kernel computes the same function: the same perplexity, to float order
    for d in DOMAINS:
        assert data["perplexity"][str(tiny_moe)]["ppl"][d] == pytest.approx(default.perplexity[str(tiny_moe)].ppl(d),
                                                                            rel=1e-4)
    with pytest.raises(MoefyError, match="'fused' is not one of grouped_mm, eager, batched_mm"):
        api.evaluate([str(tiny_moe)], str(tmp_path / "no-corpus-read-first"), experts_implementation="fused")


def test_eval_errors(capsys, tiny_llama, heldout):
    code = cli.main(["eval", str(tiny_llama), "--data", str(heldout), "--seq-len", "4096"])
    err = capsys.readouterr().err
    assert code == 2 and "fewer than the context length 4096" in err and len(err.strip().splitlines()) == 1


def test_analyze_report(tiny_moe, heldout, tmp_path):
    paths = api.analyze(str(tiny_moe), str(heldout), tmp_path / "report", seq_len=32, tokens_per_domain=256)
    data = json.loads(paths["json"].read_text())
    assert data["domains"] == sorted(DOMAINS) and len(data["layers"]) == 2
    for layer in data["layers"]:
        for d in DOMAINS:
            assert abs(sum(layer["load"][d]) - 1) < 1e-9
            assert 0 <= layer["entropy"][d] <= np.log(4) + 1e-6
            assert 0.25 <= layer["top1_confidence"][d] <= 1
        dist = np.array(layer["distance"])
        assert np.allclose(dist, dist.T) and np.allclose(np.diag(dist), 0)
    for key in ("load", "distance", "specialisation", "entropy"):
        assert paths[key].stat().st_size > 5000  # a real plot, not an empty file
    assert "load_heatmaps.png" in paths["html"].read_text() and paths["markdown"].is_file()


def test_analyze_refuses_dense_models_and_existing_output(tiny_llama, tiny_moe, heldout, tmp_path):
    with pytest.raises(MoefyError, match="has no routers to analyse"):
        api.analyze(str(tiny_llama), str(heldout), tmp_path / "r")
    (tmp_path / "exists").mkdir()
    with pytest.raises(MoefyError, match="already exists"):
        api.analyze(str(tiny_moe), str(heldout), tmp_path / "exists")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tiny_moe, heldout, tmp_path):
    import matplotlib.image

    from conftest import ARTIFACTS

    paths = api.analyze(str(tiny_moe), str(heldout), tmp_path / "report", seq_len=32, tokens_per_domain=256)
    shot = ARTIFACTS / "analyze_report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2200", "--hide-scrollbars",
                    f"--screenshot={shot}", paths["html"].as_uri()], check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3].reshape(-1, 3)
    colours = len(np.unique((pixels * 255).astype(np.uint8), axis=0))
    # The heatmaps and line plots bring hundreds of colours; a page of broken images and text has a few dozen.
    assert colours > 300, colours


def test_offline_lm_eval_task_from_the_demo_corpus(tiny_llama, tmp_path):
    pytest.importorskip("lm_eval")
    from moefy.data.demo_corpus import TASK_NAME, build_demo_corpus

    build_demo_corpus(tmp_path / "corpus")
    task = tmp_path / "corpus" / "tasks" / f"{TASK_NAME}.yaml"
    result = api.evaluate([str(tiny_llama)], str(tmp_path / "corpus" / "heldout"), seq_len=32, tokens_per_domain=64,
                          tasks=[str(task)], task_limit=8)
    scores = result.tasks[str(tiny_llama)][TASK_NAME]
    assert set(scores) == {"acc", "acc_norm"} and 0.0 <= scores["acc"] <= 1.0


def test_task_errors(tiny_llama, heldout, tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(MoefyError, match="task file not found"):
        api.evaluate([str(tiny_llama)], str(heldout), seq_len=32, tasks=[str(tmp_path / "nope.yaml")])
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(MoefyError, match="not an lm-eval task file"):
        api.evaluate([str(tiny_llama)], str(heldout), seq_len=32, tasks=[str(tmp_path / "bad.yaml")])


def _layer(seed: int, tokens: int = 64, experts: int = 6, hidden: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, hidden, generator=gen), torch.randn(tokens, experts, hidden, generator=gen),
            torch.randn(tokens, experts, generator=gen).softmax(-1))


@pytest.mark.parametrize("renormalise", [True, False])
def test_greedy_routing_is_never_worse_than_the_router(renormalise):
    from moefy.export.oracle import _routed, greedy_routing

    shared, outputs, probs = _layer(0)
    target = torch.randn(shared.shape, generator=torch.Generator().manual_seed(1))
    k = 2
    chosen = greedy_routing(shared, outputs, probs, target, k, renormalise, chunk=16)  # chunks: 4 of them
    assert (chosen.sum(-1) == k).all()
    top = torch.zeros_like(chosen).scatter_(-1, probs.topk(k, dim=-1).indices, True)
    err = lambda c: ((_routed(shared, outputs, probs, c, renormalise) - target) ** 2).sum(-1)  # noqa: E731
    assert (err(chosen) <= err(top)).all() and (err(chosen) < err(top)).any()


def test_greedy_routing_finds_the_expert_that_is_the_target():
    """With k = 1 and renormalised weights an expert's weight is 1, so an expert equal to target - shared is found
    whatever the router prefers; with k = N every expert is chosen."""
    from moefy.export.oracle import greedy_routing

    shared, outputs, probs = _layer(2)
    want = torch.arange(len(probs)) % outputs.shape[1]
    target = shared + outputs[torch.arange(len(probs)), want]
    chosen = greedy_routing(shared, outputs, probs, target, 1)
    assert torch.equal(chosen.float().argmax(-1), want)
    assert greedy_routing(shared, outputs, probs, target, outputs.shape[1]).all()


def test_eval_oracles_bound_a_build_on_a_corpus(capsys, monkeypatch, tiny_llama, heldout, tmp_path):
    from moefy.construct.recipe import BuildRecipe
    from moefy.recipes import validate_recipe

    every = tmp_path / "every"  # all experts active: both oracles are the dense model itself
    api.build(validate_recipe(BuildRecipe, {"model": str(tiny_llama), "experts": 4, "top_k": 4,
                                            "method": "cluster"}), every)
    half = tmp_path / "half"
    api.build(validate_recipe(BuildRecipe, {"model": str(tiny_llama), "experts": 4, "top_k": 2,
                                            "method": "cluster"}), half)
    result = api.evaluate([str(tiny_llama), str(every), str(half)], str(heldout), seq_len=32, tokens_per_domain=256,
                          oracle=True)
    dense = result.perplexity[str(tiny_llama)]
    assert set(result.oracles) == {str(every), str(half)}  # the dense model has no plan to bound
    full = result.oracles[str(every)]
    assert full.active_fraction == 1.0
    for d in dense.per_domain:
        assert full.expert.per_domain[d] == pytest.approx(dense.per_domain[d], abs=1e-5)
        assert full.neuron.per_domain[d] == pytest.approx(dense.per_domain[d], abs=1e-5)
        # every expert active: the routing oracle has nothing to choose, so it is the build as it routes itself
        assert full.routing.per_domain[d] == pytest.approx(result.perplexity[str(every)].per_domain[d], abs=1e-5)
    o = result.oracles[str(half)]
    assert o.active_fraction == 0.5 and o.expert.tokens == dense.tokens == o.routing.tokens
    built = result.perplexity[str(half)]
    assert abs(o.routing.overall_loss - built.overall_loss) > 1e-4  # it chose other experts than the router did
    # half the FFN is gone: both bounds moved, each its own way (on a random tiny model neither need be the lower)
    assert abs(o.expert.overall_loss - dense.overall_loss) > 1e-4
    assert abs(o.neuron.overall_loss - dense.overall_loss) > 1e-4
    assert abs(o.expert.overall_loss - o.neuron.overall_loss) > 1e-4
    # the dense model evaluated above served both builds' oracles; loaded afresh for them alone, it gives the same
    alone = api.evaluate([str(half)], str(heldout), seq_len=32, tokens_per_domain=256, oracle=True).oracles[str(half)]
    for ours, fresh in ((o.expert, alone.expert), (o.neuron, alone.neuron), (o.routing, alone.routing)):
        assert ours.per_domain == pytest.approx(fresh.per_domain, abs=1e-6)

    out = tmp_path / "eval.json"
    monkeypatch.setenv("COLUMNS", "400")  # wide enough that rich does not wrap the column titles searched below
    assert cli.main(["eval", str(half), "--data", str(heldout), "--seq-len", "32", "--tokens-per-domain", "256",
                     "--oracle", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expert oracle" in printed and "neuron oracle at 50%" in printed
    saved = json.loads(out.read_text())["oracles"][str(half)]
    assert saved["active_fraction"] == 0.5
    assert saved["expert"]["overall_ppl"] == pytest.approx(o.expert.ppl(), rel=1e-6)
    assert "routing oracle (own experts)" in printed
    assert saved["routing"]["overall_ppl"] == pytest.approx(o.routing.ppl(), rel=1e-6)

    assert cli.main(["eval", str(tiny_llama), "--data", str(heldout), "--oracle"]) == 2
    assert "--oracle needs a moefy build" in capsys.readouterr().err


def test_speed_compiled_times_the_models_compiled_and_gives_them_back_plain(tiny_llama, tiny_moe):
    from moefy.evaluate.speed import measure
    from moefy.models import load_causal_lm

    models = {"dense": load_causal_lm(tiny_llama), "moe": load_causal_lm(tiny_moe)}
    ids = torch.randint(0, models["dense"].config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :32]
    before = models["moe"].generate(prompt, max_new_tokens=6, do_sample=False)
    calls = []

    def backend(gm, example_inputs):  # dynamo's capture without inductor's C++ build: the test stays fast
        calls.append(len(gm.graph.nodes))
        return gm.forward

    speed = measure(models, ids, new_tokens=4, repeats=1, compile_backend=backend)
    assert len(calls) >= 4 * len(models)  # each model's forward, prefill, prompt and decode step ran compiled
    # dynamo counts compiled variants per code object over the process, and the models share transformers'
    # decorators: each measurement starts that count afresh, so new input widths never run into its limit
    for width in (36, 38, 40):
        calls.clear()
        measure(models, ids[:, :width], new_tokens=4, repeats=1, compile_backend=backend)
        assert len(calls) >= 4 * len(models)
    assert all(s.compile_s > 0 and s.generate_tokens_per_s > 0 for s in speed.values())
    assert all("forward" not in vars(m) for m in models.values())  # the class's own forward again
    assert torch.equal(models["moe"].generate(prompt, max_new_tokens=6, do_sample=False), before)
    assert measure(models, ids, new_tokens=4, repeats=1)["moe"].compile_s is None
    own = models["dense"].forward  # a forward set on the instance by the caller comes back as it was
    models["dense"].forward = own
    measure(models, ids, new_tokens=4, repeats=1, compile_backend=backend)
    assert vars(models["dense"])["forward"] is own and "forward" not in vars(models["moe"])


def test_speed_compile_failure_is_one_line(tiny_llama):
    from moefy.evaluate.speed import measure
    from moefy.models import load_causal_lm

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found\n(pages of detail)")

    model = load_causal_lm(tiny_llama)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with pytest.raises(MoefyError, match=r"failed on dense: RuntimeError: no C\+\+ compiler found; time it") as e:
        measure({"dense": model}, ids, new_tokens=2, repeats=1, compile_backend=broken)
    assert "\n" not in str(e.value) and "forward" not in vars(model)


def test_eval_compile_needs_speed_and_a_compilable_kernel(tiny_moe, tmp_path):
    with pytest.raises(MoefyError, match="needs --speed"):
        api.evaluate([str(tiny_moe)], str(tmp_path / "no-corpus-read-first"), compiled=True)
    with pytest.raises(MoefyError, match="cannot time the eager experts kernel"):
        api.evaluate([str(tiny_moe)], str(tmp_path / "no-corpus-read-first"), speed=True, compiled=True,
                     experts_implementation="eager")
