"""moefy train on tiny models: stages, gating, mixtures, errors, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import write_domain_corpus

from moefy import api, cli
from moefy.errors import MoefyError
from moefy.recipes import TRAIN_RECIPE
from moefy.train.mixture import initial_weights, sheared_llama_update
from moefy.train.recipe import Mixture

DOMAINS = {"alpha": "ab ", "digits": "0123 ", "punct": "!?. "}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # punct is tiny: it must cycle, not stop the run
    return write_domain_corpus(tmp_path_factory.mktemp("train") / "train.jsonl", DOMAINS,
                               {"alpha": 10, "digits": 10, "punct": 1}, {"alpha": 150, "digits": 150, "punct": 100},
                               seed=2)


def write_recipe(path, stages, **extra):
    path.write_text(yaml.safe_dump({"stages": stages, **extra}))
    return path


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stages_gating_and_export(tiny_moe, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    recipe = write_recipe(tmp_path / "r.yaml", [
        {"name": "soft", "trainable": "router", "tokens": 5 * 4 * 32, "seq_len": 32, "lr": 1e-2,
         "gating": {"soft_temperature": 2.0}},
        {"name": "sparse", "trainable": "experts", "tokens": 5 * 4 * 32, "seq_len": 32, "lr": 1e-3,
         "gating": {"noise": 1.0, "balance": "cv", "z_loss_coef": 1e-3, "bias_update_rate": 1e-3}},
    ], checkpoint_every=4)
    final = api.train(tiny_moe, str(corpus), recipe, tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(model, MixtralForCausalLM)
    before = AutoModelForCausalLM.from_pretrained(tiny_moe)
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, before.model.layers[0].mlp.gate.weight)
    assert torch.equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)  # not in a trainable set
    recs = records(tmp_path / "run")
    assert [r["stage"] for r in recs] == ["soft"] * 5 + ["sparse"] * 5
    assert all(r["aux_loss"] == 0 for r in recs[:5]) and all(r["aux_loss"] > 0 for r in recs[5:])
    assert recs[-1]["domain_epochs"]["punct"] > 0  # the small domain cycled
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2  # keep_last
    assert (tmp_path / "run" / "loss.png").stat().st_size > 5000 and (final / "moefy_plan.json").is_file()
    assert not hasattr(model.model.layers[0].mlp.gate, "forward") or "forward" not in vars(model.model.layers[0].mlp.gate)


def test_training_lowers_the_loss(tiny_moe, corpus, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", [{"trainable": "all", "tokens": 30 * 4 * 32, "seq_len": 32,
                                                 "lr": 3e-3, "warmup_steps": 2}])
    api.train(tiny_moe, str(corpus), recipe, tmp_path / "run")
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2


def test_killed_run_resumes_exactly(tiny_moe, corpus, tmp_path):
    stages = [{"name": "a", "trainable": "router+norm", "tokens": 6 * 2 * 32, "seq_len": 32, "batch_size": 2,
               "lr": 1e-2, "gating": {"noise": 0.5}},
              {"name": "b", "trainable": "experts-lora", "tokens": 8 * 2 * 32, "seq_len": 32, "batch_size": 2,
               "grad_accum": 2, "lr": 1e-2, "gating": {"balance": "switch", "bias_update_rate": 1e-2},
               "distill": {"temperature": 2.0, "lm_weight": 0.5}},
              # a long cheap tail, so the child is certainly still running when it is killed after step 9
              {"name": "c", "trainable": "router", "tokens": 60 * 1 * 32, "seq_len": 32, "batch_size": 1}]
    recipe = write_recipe(tmp_path / "r.yaml", stages, checkpoint_every=3, keep_last=5)
    api.train(tiny_moe, str(corpus), recipe, tmp_path / "straight")
    # Same run in a child process, SIGKILLed once it has checkpointed mid-way through stage b, then resumed.
    env = {**os.environ, "MOEFY_QUIET": "1"}
    cmd = [sys.executable, "-m", "moefy", "train", str(tiny_moe), "--data", str(corpus), "--recipe", str(recipe),
           "--out", str(tmp_path / "killed")]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"

    def past_stage_a() -> bool:  # a checkpoint inside stage b or later (keep_last may already have dropped step 9)
        return checkpoints.is_dir() and any(int(p.name.split("-")[1]) >= 9 for p in checkpoints.glob("step-*"))

    deadline = time.time() + 300
    while not past_stage_a() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert past_stage_a(), "the child never reached a mid-run checkpoint"
    assert not (tmp_path / "killed" / "final").exists()
    assert cli.main(["train", "--resume", str(tmp_path / "killed")]) == 0
    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 71))  # 6 + 4 + 60 steps
    # Bit-exact on the CPU. A GPU's kernels (atomic adds in backward) need not repeat bit for bit, and a run
    # parts by rounding there (2e-4 relative seen on an H100).
    tol = {"abs": 1e-6} if not torch.cuda.is_available() else {"rel": 1e-2}
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], **tol), a["step"]
        assert a.get("distill_loss", 0) == pytest.approx(b.get("distill_loss", 0), **tol), a["step"]
        assert a["weights"] == b["weights"]


def test_dynamic_mixture_moves_weights(tiny_moe, corpus, tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path / "r.yaml", [{
        "trainable": "router", "tokens": 6 * 4 * 32, "seq_len": 32, "lr": 1e-2,
        "mixture": {"dynamic": True, "eval_every": 2, "eta": 5.0, "eval_tokens_per_domain": 64}}])
    # The MoE's plan names its dense source, whose held-out losses are the reference (measured, cached in the run).
    api.train(tiny_moe, str(corpus), recipe, tmp_path / "run")
    recs = records(tmp_path / "run")
    assert (tmp_path / "run" / "reference_loss_32.json").is_file()
    assert recs[0]["weights"] == pytest.approx({d: 1 / 3 for d in DOMAINS})
    assert recs[-1]["weights"] != recs[0]["weights"]
    assert sum(recs[-1]["weights"].values()) == pytest.approx(1.0)
    assert "eval_loss" in recs[1]


def test_train_from_flags_alone(capsys, tiny_moe, corpus, tmp_path):
    """No YAML: the stage flags are the one stage, and the resolved recipe is saved in the run; a resumed run keeps
    the recipe it started with, so recipe flags beside --resume are refused."""
    run = tmp_path / "run"
    assert cli.main(["train", str(tiny_moe), "--data", str(corpus), "--out", str(run), "--trainable", "norm",
                     "--tokens", str(2 * 4 * 32), "--seq-len", "32", "--lr", "0.01", "--seed", "3"]) == 0
    saved = yaml.safe_load((run / TRAIN_RECIPE).read_text())
    assert saved["seed"] == 3 and saved["stages"][0]["trainable"] == "norm" and saved["stages"][0]["lr"] == 0.01
    assert [r["stage"] for r in records(run)] == ["stage"] * 2
    assert cli.main(["train", "--resume", str(run), "--lr", "0.1"]) == 2
    assert "a resumed run keeps the recipe it started with" in capsys.readouterr().err


def test_mixture_functions():
    assert initial_weights(Mixture(preset="custom", weights={"a": 3, "b": 1}), ["a", "b"]) == {"a": 0.75, "b": 0.25}
    with pytest.raises(MoefyError, match="no weight for domain"):
        initial_weights(Mixture(preset="llama"), ["code", "cc"])
    w = sheared_llama_update({"a": 0.5, "b": 0.5}, {"a": 3.0, "b": 2.0}, {"a": 2.0, "b": 2.0}, eta=1.0, smoothing=0.0)
    assert w["a"] > w["b"] and sum(w.values()) == pytest.approx(1.0)


def test_train_errors(capsys, tiny_moe, corpus, tmp_path, tiny_llama):
    bad = write_recipe(tmp_path / "bad.yaml", [{"tokens": 10, "optimizer": "sgd"}])
    assert cli.main(["train", str(tiny_moe), "--data", str(corpus), "--recipe", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "optimizer: Extra inputs are not permitted" in capsys.readouterr().err
    small = write_recipe(tmp_path / "s.yaml", [{"tokens": 64, "seq_len": 32}])
    assert cli.main(["train", str(tiny_moe), "--data", str(corpus), "--recipe", str(small), "--out", str(tmp_path / "r")]) == 2
    assert "token budget 64 is smaller than one optimizer step" in capsys.readouterr().err
    assert cli.main(["train", str(tiny_moe), "--data", str(corpus), "--recipe", "nosuch", "--out", str(tmp_path / "r")]) == 2
    assert "recipe file not found: nosuch" in capsys.readouterr().err
    dense_recipe = write_recipe(tmp_path / "d.yaml", [{"tokens": 128, "seq_len": 32}])
    assert cli.main(["train", str(tiny_llama), "--data", str(corpus), "--recipe", str(dense_recipe),
                     "--out", str(tmp_path / "r2")]) == 2
    assert "matches no parameter" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path)]) == 2
    assert "is not a moefy training run" in capsys.readouterr().err


def test_trainable_sets_select_by_name(tiny_moe):
    from transformers import AutoModelForCausalLM

    from moefy.train.trainable import select_trainable

    model = AutoModelForCausalLM.from_pretrained(tiny_moe)
    names = {n for n, _ in select_trainable(model, "norm")}
    assert names and all(n.endswith("norm.weight") for n in names)
    router = {n for n, _ in select_trainable(model, "router")}
    assert router == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in router)


def test_corrupt_checkpoint_on_resume(capsys, tiny_moe, corpus, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", [{"tokens": 4 * 4 * 32, "seq_len": 32}], checkpoint_every=2)
    api.train(tiny_moe, str(corpus), recipe, tmp_path / "run")
    latest = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    (latest / "trainable.safetensors").write_bytes(b"\x00" * 20)
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moefy: error: corrupt checkpoint") and err.count("\n") == 1


def test_distillation_from_the_dense_teacher(tiny_llama, corpus, tmp_path):
    """An upcycled MoE (exact copies, top-1, scale 1) is the dense model: the KL to its teacher must be 0. A lossy
    MoE starts far from its teacher and distillation brings it closer."""
    from moefy.construct.recipe import BuildRecipe
    from moefy.recipes import validate_recipe

    exact = tmp_path / "upcycled"
    api.build(validate_recipe(BuildRecipe, {"model": str(tiny_llama), "method": "upcycle", "experts": 2,
                                            "top_k": 1}), exact)
    stage = {"name": "kd", "trainable": "experts", "tokens": 8 * 4 * 32, "seq_len": 32, "lr": 3e-3,
             "distill": {"temperature": 1.0, "hidden_weight": 0.1}}
    api.train(exact, str(corpus), write_recipe(tmp_path / "r.yaml", [stage]), tmp_path / "exact")
    # exactly 0 in fp32; on a GPU the bf16 teacher and bf16 autocast leave rounding noise (1.5e-5 on an H100)
    exact_kl = 1e-6 if not torch.cuda.is_available() else 1e-4
    assert records(tmp_path / "exact")[0]["distill_loss"] == pytest.approx(0.0, abs=exact_kl)

    lossy = tmp_path / "random"
    api.build(validate_recipe(BuildRecipe, {"model": str(tiny_llama), "method": "random", "experts": 4,
                                            "top_k": 1}), lossy)
    api.train(lossy, str(corpus), write_recipe(tmp_path / "r2.yaml", [stage]), tmp_path / "lossy")
    kd = [r["distill_loss"] for r in records(tmp_path / "lossy")]
    assert kd[0] > 0.01 and sum(kd[-2:]) < sum(kd[:2])


@pytest.mark.parametrize("chunk_elements", [1 << 24, 3 * 50])  # all rows at once; 3 rows a chunk, the last short
def test_chunked_kl_equals_autograd_over_the_formula(monkeypatch, chunk_elements):
    """The chunked distillation loss and its hand-written gradient against autograd over the plain formula, at
    T = 2 (a wrong temperature factor in either is off by 2x)."""
    from moefy.train import distill

    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    student, teacher, t = torch.randn(2, 5, 50, generator=gen) * 3, torch.randn(2, 5, 50, generator=gen) * 3, 2.0
    upstream = torch.randn((), generator=gen)
    ours = student.clone().requires_grad_()
    value = distill.ChunkedKL.apply(ours, teacher, t)
    (value * upstream).backward()
    ref = student.clone().requires_grad_()
    logp_t, logp_s = torch.log_softmax(teacher / t, -1), torch.log_softmax(ref / t, -1)
    expected = (logp_t.exp() * (logp_t - logp_s)).sum() * t * t
    (expected * upstream).backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)


def test_logged_lm_loss_is_the_models_own(tiny_llama):
    """A distillation stage with LM weight 0 logs the LM loss outside autograd: the same number transformers
    computes from labels."""
    from transformers import AutoModelForCausalLM

    from moefy.train.distill import logged_lm_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    logged = logged_lm_loss(out.logits, ids)
    assert not logged.requires_grad and logged.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_distillation_needs_a_teacher(tiny_moe, corpus, tmp_path):
    moe = tmp_path / "moe"
    moe.mkdir()
    for f in tiny_moe.iterdir():
        (moe / f.name).write_bytes(f.read_bytes())
    (moe / "moefy_plan.json").unlink()
    stage = {"tokens": 4 * 32, "seq_len": 32, "distill": {}}
    with pytest.raises(MoefyError, match="needs the dense source model"):
        api.train(moe, str(corpus), write_recipe(tmp_path / "r.yaml", [stage]), tmp_path / "run")


def test_trained_model_keeps_the_moes_dtype(tiny_llama, corpus, tmp_path):
    """Training runs in fp32; the result is written in the MoE's own dtype (a bf16 7B MoE stays 13.5 GB, not 27),
    unless --dtype names another. Weights no stage touched come back bit for bit: bf16 → fp32 → bf16 is exact."""
    from safetensors.torch import load_file

    from moefy.construct.recipe import BuildRecipe
    from moefy.recipes import validate_recipe

    moe = tmp_path / "moe"
    api.build(validate_recipe(BuildRecipe, {"model": str(tiny_llama), "experts": 4, "top_k": 2, "method": "random",
                                            "dtype": "bfloat16"}), moe)
    built = load_file(moe / "model.safetensors")
    flags = ["--data", str(corpus), "--trainable", "router", "--tokens", str(2 * 4 * 32), "--seq-len", "32",
             "--lr", "0.01"]
    assert cli.main(["train", str(moe), *flags, "--out", str(tmp_path / "source")]) == 0
    assert cli.main(["train", str(moe), *flags, "--out", str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    for run, dtype, name in [("source", torch.bfloat16, "bfloat16"), ("fp32", torch.float32, "float32")]:
        final = tmp_path / run / "final"
        trained = load_file(final / "model.safetensors")
        assert {t.dtype for t in trained.values()} == {dtype}
        assert json.loads((final / "config.json").read_text())["dtype"] == name
        router = "model.layers.0.block_sparse_moe.gate.weight"
        assert not torch.equal(trained[router].float(), built[router].float())
        assert sorted(trained) == sorted(built)
        untouched = [n for n in built if not n.endswith("moe.gate.weight")]  # every layer's router trained
        assert all(torch.equal(trained[n].to(torch.bfloat16), built[n]) for n in untouched)
