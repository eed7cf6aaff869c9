"""Layer-wise reconstruction (construct/reconstruct.py, construct/refit.py) on tiny models: the closed form is exact
where the dense FFN is representable, the exported model computes what the fit computed, errors drop, the
construction still passes the exactness check, and the build is deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moefy import api, cli
from moefy.construct import refit
from moefy.construct.plan import load_plan
from moefy.construct.recipe import BuildRecipe
from moefy.recipes import validate_recipe

SEQ = 32


def moe_output(x, p, weights):
    """What refit.refine's steps fit, in the design-matrix form: the routed experts (weighted) plus the shared block,
    for weights in refine's layout (gate, up [N·S, H]; down [H, N·S]; shared_*)."""
    z = refit.design(refit.activations(x, p["gate"], p["up"]), weights,
                     refit.activations(x, p["shared_gate"], p["shared_up"]))
    return z @ torch.cat([p["down"], p["shared_down"]], dim=1).T


def build(model, corpus, out, **fields):
    recipe = validate_recipe(BuildRecipe, {"model": str(model), "calib": str(corpus), "experts": 8, "top_k": 2,
                                           "profile": {"seq_len": SEQ},
                                           "reconstruct": {"enabled": True, "seq_len": SEQ}, **fields})
    return api.build(recipe, out)


def test_closed_form_recovers_a_representable_ffn():
    """With every expert active and a constant gate, the dense FFN is exactly an MoE: the solve must find it."""
    g = torch.Generator().manual_seed(0)
    t, h, width, n = 512, 16, 24, 4
    x, gate, up, down = (torch.randn(*s, generator=g) for s in ((t, h), (width, h), (width, h), (h, width)))
    a = refit.activations(x, gate, up)
    y = a @ down.T
    experts = np.arange(width).reshape(n, -1)
    a_exp, a_sh = refit.gather_slots(a, experts), a[:, :0]
    weights = refit.route(torch.zeros(t, n), n)  # uniform 1/N
    normal = refit.Normal(width, h)
    normal.add(refit.design(a_exp, weights, a_sh), y)
    d_exp, _ = refit.split_downs(normal.solve(ridge=0.0), n, width // n)
    assert torch.allclose(d_exp, down.view(h, n, -1).permute(1, 0, 2) * n, atol=1e-3)


def test_pad_slots_and_unused_experts_get_zero_weights():
    normal = refit.Normal(3, 2)
    z = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 1.0], [0.5, 0.0, 0.5]])
    normal.add(z, torch.randn(3, 2))
    assert (normal.solve(1e-3)[1] == 0).all()


@pytest.mark.parametrize("dead", [False, True])
def test_ridge_solve_matches_the_textbook_solution(dead):
    """The factor overwrites the Gram matrix in place (memory); the answer must be (ZᵀZ + λI)⁻¹ZᵀY, λ relative to
    the mean energy of the live columns, with or without an all-zero column beside them."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    if dead:
        z[:, 2] = 0
    live = [c for c in range(6) if not (dead and c == 2)]
    zl = z[:, live]
    gram = zl.T @ zl
    lam = 0.1 * gram.diagonal().mean()
    want = torch.linalg.solve(gram + lam * torch.eye(len(live), dtype=torch.float64), zl.T @ y)
    normal = refit.Normal(6, 3)
    normal.add(z.float(), y.float())
    got = normal.solve(ridge=0.1)
    assert torch.allclose(got[live], want.float(), atol=1e-4)
    if dead:
        assert (got[2] == 0).all()


@pytest.mark.parametrize("steps", [0, 5])
@pytest.mark.parametrize("method,architecture", [("carve", "Qwen2MoeForCausalLM"), ("random", "MixtralForCausalLM")])
def test_exported_model_computes_what_the_fit_computed(llama3, ab_corpus, tmp_path, method, architecture, steps):
    """Layer 0 sees the same inputs in the dense and the converted model, so the exported MoE layer's error there
    must equal the fit's reported error: fitted weights, scale, shared doubling and routing all land as fitted."""
    from moefy.data.corpus import load_corpus
    from moefy.data.tokens import token_blocks
    from moefy.models import load_causal_lm, load_tokenizer

    result = build(llama3, ab_corpus, tmp_path / "moe", method=method,
                   reconstruct={"enabled": True, "seq_len": SEQ, "steps": steps, "lr_ratio": 1e-2})
    assert result.architecture == architecture
    assert all(f.after < f.before for f in result.reconstruction)
    blocks = token_blocks(load_corpus(ab_corpus), load_tokenizer(llama3), SEQ, 4096, 0)
    ids = torch.cat([blocks.blocks[d] for d in blocks.domains])
    dense, moe = load_causal_lm(llama3), load_causal_lm(tmp_path / "moe")
    seen = {}
    dense.model.layers[0].mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        dense(input_ids=ids)
        y_hat = moe.model.layers[0].mlp(seen["x"])
    assert refit.nmse(seen["y"], y_hat) == pytest.approx(result.reconstruction[0].after, rel=1e-3)
    assert api.verify(tmp_path / "moe", str(llama3)).passed  # the construction under the fitted weights is exact


def test_reconstruction_is_saved_verified_and_deterministic(capsys, llama3, ab_corpus, tmp_path):
    argv = ["build", str(llama3), "--method", "carve", "--experts", "8", "--top-k", "2", "--calib", str(ab_corpus),
            "--seq-len", str(SEQ), "--reconstruct", "--recipe"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"reconstruct: {{seq_len: {SEQ}}}\n")
    assert cli.main([*argv, str(recipe), "--out", str(tmp_path / "a")]) == 0
    assert "reconstruction (layer nMSE)" in capsys.readouterr().out
    fits = json.loads((tmp_path / "a" / "reconstruction.json").read_text())
    assert [f["layer"] for f in fits] == [0, 1, 2] and all(f["nmse_after"] < f["nmse_before"] for f in fits)
    assert (tmp_path / "a" / "reconstruction.png").is_file()
    card = (tmp_path / "a" / "README.md").read_text()  # the card says what was done to the experts
    assert "refitted to the dense model layer by layer" in card and "training-free construction" not in card
    report = api.verify(tmp_path / "a", str(llama3))  # the construction under the fitted weights is still exact
    assert report.passed and report.check == "uniform"
    assert cli.main([*argv, str(recipe), "--out", str(tmp_path / "b")]) == 0
    a, b = load_plan(tmp_path / "a"), load_plan(tmp_path / "b")
    for i in a.layers:
        assert torch.equal(a.layers[i].router, b.layers[i].router)
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "a", tmp_path / "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # The fitted weights are the checkpoint's: the plan lists them and does not hold a second copy, and the
    # per-layer spill files are gone.
    assert a.meta.fitted == {i: ["down", "gate", "shared_down", "shared_gate", "shared_up", "up"] for i in range(3)}
    assert not any("fitted" in k for k in load_file(str(tmp_path / "a" / "moefy_plan.safetensors")))
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_dir()) == []
    # A plan written before (fitted weights copied into it, no list in its JSON) still tells verify which they are.
    plan_json = tmp_path / "a" / "moefy_plan.json"
    plan_json.write_text(json.dumps({k: v for k, v in json.loads(plan_json.read_text()).items() if k != "fitted"}))
    old = load_file(str(tmp_path / "a" / "moefy_plan.safetensors"))
    save_file({**old, "layers.1.fitted.down": torch.zeros(1)}, str(tmp_path / "a" / "moefy_plan.safetensors"))
    assert load_plan(tmp_path / "a").meta.fitted == {1: ["down"]}


def test_dense_layers_pass_through_and_refitted_routers(llama3, ab_corpus, tmp_path):
    result = build(llama3, ab_corpus, tmp_path / "moe", method="carve", layers=[0, 2],
                   reconstruct={"enabled": True, "seq_len": SEQ, "target": "ffn", "rounds": 2, "router": True})
    assert [f.layer for f in result.reconstruction] == [0, 2]
    assert all(f.temperature is not None and f.after < f.before for f in result.reconstruction)
    assert api.verify(tmp_path / "moe", str(llama3)).passed


def test_reconstruction_needs_calibration_data(capsys, llama3, tmp_path):
    code = cli.main(["build", str(llama3), "--reconstruct", "--out", str(tmp_path / "moe")])
    err = capsys.readouterr().err
    assert code == 2 and "pass --calib" in err and not (tmp_path / "moe").exists()


def test_training_runs_a_reconstruction_stage_first(llama3, ab_corpus, tmp_path):
    """`reconstruct: {enabled: true}` in a train recipe refits the MoE as built (without reconstruction) on the
    training data, before the first stage: bit-identical to `build --reconstruct` on that corpus, then trained."""
    import yaml

    plain = build(llama3, ab_corpus, tmp_path / "moe", method="carve", reconstruct={"enabled": False})
    assert plain.reconstruction is None
    rec = {"enabled": True, "seq_len": SEQ, "steps": 5}
    built = build(llama3, ab_corpus, tmp_path / "built", method="carve", reconstruct=rec)
    recipe = tmp_path / "train.yaml"
    recipe.write_text(yaml.safe_dump({"reconstruct": rec, "stages": [
        {"trainable": "router", "tokens": 2 * 2 * SEQ, "seq_len": SEQ, "batch_size": 2}]}))
    final = api.train(tmp_path / "moe", str(ab_corpus), recipe, tmp_path / "run")
    staged = tmp_path / "run" / api.RECONSTRUCTED
    ws, wb = (load_file(str(d / "model.safetensors")) for d in (staged, tmp_path / "built"))
    assert ws.keys() == wb.keys() and all(torch.equal(ws[k], wb[k]) for k in ws)
    fits = json.loads((staged / "reconstruction.json").read_text())
    assert [f["nmse_after"] for f in fits] == [f.after for f in built.reconstruction]
    # training started from the reconstructed MoE: its experts, not the plain build's, are in the final model
    wf, wp = load_file(str(final / "model.safetensors")), load_file(str(tmp_path / "moe" / "model.safetensors"))
    down = next(k for k in wf if "experts" in k and "down" in k)
    assert torch.equal(wf[down], ws[down]) and not torch.equal(wf[down], wp[down])
    # what the stage saved reproduces it: a build from its recipe gives the same checkpoint
    assert cli.main(["build", "--recipe", str(staged / "moefy.yaml"), "--out", str(tmp_path / "again")]) == 0
    wa = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(wa[k], ws[k]) for k in ws)


def test_a_reconstruction_stage_needs_a_moefy_build(capsys, llama3, ab_corpus, tmp_path):
    recipe = tmp_path / "train.yaml"
    recipe.write_text(f"reconstruct: {{enabled: true}}\n"
                      f"stages: [{{tokens: {2 * SEQ}, seq_len: {SEQ}, batch_size: 2}}]\n")
    code = cli.main(["train", str(llama3), "--data", str(ab_corpus), "--recipe", str(recipe),
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "no moefy plan and build recipe" in err and not (tmp_path / "run").exists()



def test_the_steps_chosen_experts_form_is_the_design_matrix_form():
    """The steps compute each token's chosen experts only (grouped matmuls over tokens sorted by expert; the CPU's
    form) or every expert (a GPU's form): output and gradients are those of a plain MoE layer over every expert,
    with a PAD slot and an expert no token chose."""
    g = torch.Generator().manual_seed(0)
    t, h, n, size, k = 64, 12, 5, 4, 2
    x = torch.randn(t, h, generator=g)
    live = torch.ones(n * size)
    live[3] = 0  # a PAD slot of expert 0
    logits = torch.randn(t, n, generator=g)
    logits[:, 4] = -1e9  # no token chooses expert 4
    p = {"gate": torch.randn(n * size, h, generator=g) / h**0.5, "up": torch.randn(n * size, h, generator=g) / h**0.5,
         "down": torch.randn(h, n * size, generator=g) * 0.1, "shared_gate": torch.zeros(0, h),
         "shared_up": torch.zeros(0, h), "shared_down": torch.zeros(h, 0)}
    grads = []
    for form in ("reference", "chosen", "all"):
        q = {key: w.clone().requires_grad_(True) for key, w in p.items()}
        chosen, weights = refit.top_k_gate(logits, k)
        if form == "reference":
            out = moe_output(x, {**q, "gate": q["gate"] * live[:, None]}, refit.route(logits, k))
        else:
            step_form = refit.chosen_experts_output if form == "chosen" else refit.all_experts_output
            out = step_form(x, chosen, weights, n, q["gate"], q["up"], q["down"], live)
        out.pow(2).sum().backward()
        grads.append((out.detach(), *(q[key].grad for key in ("gate", "up", "down"))))
    for ours in grads[1:]:
        for a, reference in zip(ours, grads[0]):
            torch.testing.assert_close(a, reference, rtol=1e-5, atol=1e-6)
    assert not grads[1][3][:, 4 * size:].any()  # the unchosen expert's down projection gets no gradient


def test_the_closed_forms_chosen_experts_design_is_the_design_matrix():
    """The closed form's routed design block, computed from each token's chosen experts only (the CPU's form) or
    from every expert (a GPU's form), is design()'s block from every expert's activations and the stock gate, with a
    PAD slot (a zero gate/up row) and an expert no token chose."""
    g = torch.Generator().manual_seed(0)
    t, h, n, size, k = 64, 12, 5, 4, 2
    x = torch.randn(t, h, generator=g)
    gate, up = torch.randn(n * size, h, generator=g), torch.randn(n * size, h, generator=g)
    gate[3], up[3] = 0, 0  # a PAD slot of expert 0
    logits = torch.randn(t, n, generator=g)
    logits[:, 4] = -1e9  # no token chooses expert 4
    reference = refit.design(refit.activations(x, gate, up), refit.route(logits, k), x[:, :0])
    chosen, weights = refit.top_k_gate(logits, k)
    for form in (refit.chosen_experts_design, refit.all_experts_design):
        torch.testing.assert_close(form(x, chosen, weights, n, gate, up), reference, rtol=1e-5, atol=1e-6)
    assert refit.routed_design_form(torch.device("cpu")) is refit.chosen_experts_design
    # the normal equations from the nonzero blocks only are those of the whole design, with a shared block
    z = torch.cat([reference, torch.randn(t, 3, generator=g)], dim=1)
    y = torch.randn(t, h, generator=g)
    whole, blocks = refit.Normal(z.shape[1], h), refit.Normal(z.shape[1], h)
    whole.add(z, y)
    blocks.add_routed(z, y, chosen, n, n * size)
    for ours, reference in ((blocks.gram, whole.gram), (blocks.cross, whole.cross)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)  # fp32 products in another order


def test_low_rank_refinement_moves_each_weight_by_a_rank_r_delta():
    g = torch.Generator().manual_seed(0)
    t, h, n, size, k, r = 256, 12, 4, 4, 2, 2
    x, y = torch.randn(t, h, generator=g), torch.randn(t, h, generator=g)
    params = {"gate": torch.randn(n * size, h, generator=g), "up": torch.randn(n * size, h, generator=g),
              "down": torch.randn(h, n * size, generator=g) * 0.1, "shared_gate": torch.randn(3, h, generator=g),
              "shared_up": torch.randn(3, h, generator=g), "shared_down": torch.randn(h, 3, generator=g) * 0.1}
    weights = refit.route(torch.randn(t, n, generator=g), k)
    masks = (torch.ones(n * size, dtype=torch.bool), torch.ones(3, dtype=torch.bool))

    def error(p):
        return refit.nmse(y, moe_output(x, p, weights))

    low = refit.refine(x, y, weights, k, params, masks, 40, 1e-2, 64, 0, rank=r)
    assert error(low) < error(params)
    for key, w in params.items():
        assert 0 < torch.linalg.matrix_rank(low[key] - w) <= r
    full = refit.refine(x, y, weights, k, params, masks, 40, 1e-2, 64, 0)
    assert torch.linalg.matrix_rank(full["gate"] - params["gate"]) > r


def test_refinement_that_trains_the_router_reroutes_and_fits_better():
    """The target comes from routing by a router the fit does not know: steps that also train the router (and
    re-route every batch) get closer than the same steps with the starting routing held fixed."""
    g = torch.Generator().manual_seed(0)
    t, h, n, size, k = 512, 12, 4, 4, 2
    x = torch.randn(t, h, generator=g)
    params = {"gate": torch.randn(n * size, h, generator=g), "up": torch.randn(n * size, h, generator=g),
              "down": torch.randn(h, n * size, generator=g) * 0.1, "shared_gate": torch.randn(3, h, generator=g),
              "shared_up": torch.randn(3, h, generator=g), "shared_down": torch.randn(h, 3, generator=g) * 0.1}
    masks = (torch.ones(n * size, dtype=torch.bool), torch.ones(3, dtype=torch.bool))

    y = moe_output(x, params, refit.route(x @ torch.randn(n, h, generator=g).T, k))
    start = torch.randn(n, h, generator=g) * 0.1
    held = refit.route(x @ start.T, k)
    fixed = refit.refine(x, y, held, k, params, masks, 100, 1e-2, 64, 0)
    trained = refit.refine(x, y, held, k, params, masks, 100, 1e-2, 64, 0, router=start)
    assert "router" not in fixed and not torch.equal(trained["router"], start)
    fixed_err = refit.nmse(y, moe_output(x, fixed, held))
    assert refit.nmse(y, moe_output(x, trained, refit.route(x @ trained["router"].T, k))) < 0.9 * fixed_err
    assert fixed_err < refit.nmse(y, moe_output(x, params, held))


@pytest.mark.parametrize("tf32,caller", [(True, False), (False, True)])
def test_step_precision_holds_for_the_steps_only(monkeypatch, tf32, caller):
    """The steps' TF32 setting is the option's, whatever the caller's process-wide flag, and the caller gets its own
    flag back, also when a step fails (the flag is global: a leak would change every later CUDA matmul)."""
    seen = []

    def steps(*args):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        raise RuntimeError("step failed")

    monkeypatch.setattr(refit, "_adam_steps", steps)
    x = torch.randn(8, 4)
    params = {k: torch.randn(2, 4) for k in ("gate", "up", "shared_gate", "shared_up")}
    params |= {"down": torch.randn(4, 2), "shared_down": torch.randn(4, 2)}
    masks = (torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module: monkeypatch cannot set it
    torch.backends.cuda.matmul.allow_tf32 = caller
    try:
        with pytest.raises(RuntimeError, match="step failed"):
            refit.refine(x, x, refit.route(torch.randn(8, 1), 1), 1, params, masks, 1, 1e-2, 4, 0, tf32=tf32)
        assert seen == [tf32] and torch.backends.cuda.matmul.allow_tf32 is caller
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_activations_spilled_to_disk_give_the_same_bits(llama3, ab_corpus, tmp_path, monkeypatch):
    """Over the --max-memory budget the activations carried between layers wait on disk: the profiler's stats and a
    reconstructed build (target stream: two carried copies) are bit-identical to keeping them in memory, and the
    spill file is gone (unlinked at once, so a killed run leaves none)."""
    from moefy.data.corpus import load_corpus
    from moefy.families import family_for
    from moefy.profile.options import ProfileOptions
    from moefy.profile.runner import profile
    from moefy.sources import resolve_model

    monkeypatch.setenv("MOEFY_CACHE", str(tmp_path / "cache"))  # each build profiles afresh
    source = resolve_model(str(llama3))
    family, corpus, opts = family_for(source.config()), load_corpus(ab_corpus), ProfileOptions(seq_len=SEQ)
    kept = profile(source, family, corpus, opts, 0, tmp_path / "kept")
    spilled = profile(source, family, corpus, opts, 0, tmp_path / "spilled", max_memory="1")
    for i in range(source.config()["num_hidden_layers"]):
        for key, value in kept.layer(i).items():
            assert torch.equal(spilled.layer(i)[key], value), (i, key)
    for budget, out in ((None, "moe-kept"), ("1KiB", "moe-spilled")):
        build(llama3, ab_corpus, tmp_path / out, method="carve", max_memory=budget,
              reconstruct={"enabled": True, "seq_len": SEQ, "steps": 3})
    a, b = (load_file(tmp_path / out / "model.safetensors") for out in ("moe-kept", "moe-spilled"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any((tmp_path / "cache" / "activations").iterdir())


def test_activation_store_round_trips_and_refuses_a_wrong_shape(tmp_path):
    from moefy.profile.activations import Activations

    store = Activations([(2, 3), (4, 3)], torch.device("cpu"), budget=0, directory=tmp_path)
    x = torch.randn(4, 3)
    store[1] = x
    store[0] = torch.ones(2, 3)
    assert store.spilled and torch.equal(store[1], x) and torch.equal(store[0], torch.ones(2, 3))
    store[1][0, 0] = 5.0  # a read is a copy: the stored batch is unchanged
    assert torch.equal(store[1], x)
    with pytest.raises(ValueError, match="expected"):
        store[0] = x


@pytest.mark.parametrize("size,expected", [("8GiB", 8 * 2**30), ("500MB", 500 * 10**6), ("1.5g", 1_500_000_000),
                                           ("123", 123)])
def test_memory_sizes_parse(size, expected):
    from moefy.recipes import parse_bytes

    assert parse_bytes(size) == expected


def test_a_bad_memory_budget_is_refused_before_any_work(capsys, llama3, ab_corpus, tmp_path):
    code = cli.main(["build", str(llama3), "--method", "carve", "--calib", str(ab_corpus), "--max-memory", "lots",
                     "--out", str(tmp_path / "moe")])
    err = capsys.readouterr().err
    assert code == 2 and "not a memory size: 'lots'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "moe").exists()
