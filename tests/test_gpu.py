"""The GPU paths, on tiny models: the layer-by-layer calibration passes (profiling, reconstruction) on a GPU give the
CPU's numbers, and training runs there with bf16 autocast, a bf16 teacher, and a resume that continues the run.
Skipped, with the reason, where torch sees no CUDA GPU (CI has none; run them on a GPU machine with `pytest -m gpu`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from test_reconstruct import SEQ, moe_output
from test_train import records

from moefy import api, cli
from moefy.construct.plan import load_plan
from moefy.construct.recipe import BuildRecipe
from moefy.models import load_causal_lm
from moefy.profile.options import ProfileOptions
from moefy.recipes import validate_recipe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here")]


def test_profile_on_the_gpu_gives_the_cpu_stats(llama3, ab_corpus, tmp_path):
    from moefy.data.corpus import load_corpus
    from moefy.families import family_for
    from moefy.profile.runner import profile
    from moefy.sources import resolve_model

    source = resolve_model(str(llama3))
    family, data = family_for(source.config()), load_corpus(ab_corpus)
    opts = ProfileOptions(seq_len=SEQ, taylor=True)
    cpu = profile(source, family, data, opts, 0, tmp_path / "cpu", device="cpu")
    gpu = profile(source, family, data, opts, 0, tmp_path / "gpu", device="cuda")
    for i in range(3):
        a, b = cpu.layer(i), gpu.layer(i)
        for key in ("abs_mean", "mean", "sq_mean", "taylor"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=f"layer {i} {key}")
        torch.testing.assert_close(b["hidden"].float(), a["hidden"].float(), rtol=1e-2, atol=2e-3)
        # frequencies count threshold crossings: a value at the boundary may round to the other side
        for key in ("gate_freq", "top_freq"):
            assert (b[key] - a[key]).abs().max() < 0.01, (i, key)


def build(model, corpus, out, device, step_matmul="fp32"):
    recipe = validate_recipe(BuildRecipe, {
        "model": str(model), "calib": str(corpus), "method": "carve", "experts": 8, "top_k": 2, "device": device,
        "profile": {"seq_len": SEQ},
        "reconstruct": {"enabled": True, "seq_len": SEQ, "steps": 50, "step_matmul": step_matmul}})
    return api.build(recipe, out)


def test_reconstructed_build_on_the_gpu_matches_the_cpu_build(llama3, ab_corpus, tmp_path):
    """In fp32 (the default) the GPU build is the CPU's; with the steps in TF32 it fits as well, but is not the same
    build: the trained routers re-route every step, and TF32's rounding flips near-tied choices."""
    from transformers import AutoModelForCausalLM

    cpu = build(llama3, ab_corpus, tmp_path / "cpu", "cpu")
    gpu = build(llama3, ab_corpus, tmp_path / "gpu", "cuda")
    tf32 = build(llama3, ab_corpus, tmp_path / "tf32", "cuda", "tf32")
    assert yaml.safe_load((tmp_path / "gpu" / "moefy.yaml").read_text())["device"] == "cuda"
    for a, b, c in zip(cpu.reconstruction, gpu.reconstruction, tf32.reconstruction):
        assert b.after < b.before and c.after < c.before
        assert b.before == pytest.approx(a.before, rel=1e-3) and b.after == pytest.approx(a.after, rel=0.05)
        assert c.after == pytest.approx(a.after, rel=0.05)
    for out in ("gpu", "tf32"):  # the construction under the fitted weights is exact
        assert api.verify(tmp_path / out, str(llama3)).passed
    assert load_plan(tmp_path / "gpu").meta.fitted == load_plan(tmp_path / "cpu").meta.fitted
    ids = torch.randint(0, 200, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(d)(input_ids=ids).logits for d in (tmp_path / "cpu",
                                                                                        tmp_path / "gpu"))
    assert (la - lb).abs().max() / la.abs().max() < 0.05


def test_a_missing_gpu_is_one_line(capsys, llama3, ab_corpus, tmp_path):
    count = torch.cuda.device_count()
    argv = ["build", str(llama3), "--method", "carve", "--calib", str(ab_corpus), "--seq-len", str(SEQ),
            "--device", f"cuda:{count}", "--out", str(tmp_path / "moe")]
    assert cli.main(argv) == 2
    assert f"torch sees {count} GPU(s)" in capsys.readouterr().err and not (tmp_path / "moe").exists()


def test_training_on_the_gpu_in_bf16_with_a_bf16_teacher_and_resume(llama3, ab_corpus, tmp_path):
    from moefy.train.distill import load_teacher
    from moefy.train.loop import make_accelerator
    from moefy.train.recipe import TrainRecipe

    assert make_accelerator(TrainRecipe(stages=[{"tokens": 4 * SEQ, "seq_len": SEQ}])).mixed_precision == "bf16"
    # bf16 on the GPU whatever frozen_dtype says: it keeps weights stored only where inference would be float32
    assert all(load_teacher(llama3, torch.device("cuda"), mode).dtype == torch.bfloat16
               for mode in ("float32", "source"))
    moe = tmp_path / "moe"
    api.build(validate_recipe(BuildRecipe, {"model": str(llama3), "method": "cluster", "experts": 4, "top_k": 2}), moe)
    stages = [{"name": "kd", "trainable": "experts-lora", "tokens": 12 * 4 * SEQ, "seq_len": SEQ, "lr": 1e-2,
               "distill": {"temperature": 2.0, "lm_weight": 0.5, "hidden_weight": 0.1}},
              {"name": "all", "trainable": "all", "tokens": 12 * 4 * SEQ, "seq_len": SEQ, "lr": 3e-3}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": stages, "checkpoint_every": 6, "keep_last": 10}))
    api.train(moe, str(ab_corpus), recipe, tmp_path / "run")
    straight = records(tmp_path / "run")
    assert len(straight) == 24 and all(r["loss"] == r["loss"] for r in straight)  # no NaN
    assert all(r["distill_loss"] > 0 for r in straight[:12])
    assert sum(r["loss"] for r in straight[-3:]) < sum(r["loss"] for r in straight[12:15])
    # Resume from the step-12 checkpoint of a copy (as after a crash there): the same steps follow.
    shutil.copytree(tmp_path / "run", tmp_path / "crashed")
    shutil.rmtree(tmp_path / "crashed" / "final")
    for ckpt in (tmp_path / "crashed" / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > 12:
            shutil.rmtree(ckpt)
    assert cli.main(["train", "--resume", str(tmp_path / "crashed")]) == 0
    resumed = records(tmp_path / "crashed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):  # GPU kernels (atomics in backward) need not be bit-exact run to run
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), a["step"]


def test_sampling_calibration_on_the_gpu_runs_the_model_in_bf16(llama3, tmp_path, monkeypatch):
    loaded = []

    def spy(directory, dtype=torch.float32):
        loaded.append(dtype)
        return load_causal_lm(directory, dtype)

    monkeypatch.setattr(api, "load_causal_lm", spy)
    out = api.generate_calibration(str(llama3), tmp_path / "self.jsonl", tokens=40, seq_len=16, batch_size=2,
                                   device="cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert loaded == [expected] and len(out.read_text().splitlines()) == 3  # ceil(40 / 16) texts
    assert json.loads(out.read_text().splitlines()[0])["generated"]["device"] == "cuda"


def test_tf32_steps_fit_as_well_as_fp32_steps():
    """TF32 steps reach the error fp32 steps reach on a synthetic problem wide enough for their rounding to show, and
    TF32 is in force (results differ) where the GPU has TF32 tensor cores."""
    from moefy.construct import refit

    g = torch.Generator().manual_seed(0)
    t, h, n, size, k, shared = 4096, 256, 8, 64, 2, 32

    def rand(*shape, scale):
        return torch.randn(shape, generator=g) * scale

    params = {"gate": rand(n * size, h, scale=h**-0.5), "up": rand(n * size, h, scale=h**-0.5),
              "down": rand(h, n * size, scale=0.05), "shared_gate": rand(shared, h, scale=h**-0.5),
              "shared_up": rand(shared, h, scale=h**-0.5), "shared_down": rand(h, shared, scale=0.05)}
    truth = {key: w + rand(*w.shape, scale=0.3 * float(w.std())) for key, w in params.items()}
    x = rand(t, h, scale=1.0)
    weights = refit.route(x @ rand(n, h, scale=1.0).T, k).cuda()
    x = x.cuda()
    params, truth = ({key: w.cuda() for key, w in p.items()} for p in (params, truth))
    masks = (torch.ones(n * size, dtype=torch.bool).cuda(), torch.ones(shared, dtype=torch.bool).cuda())

    def output(p):
        return moe_output(x, p, weights)

    y = output(truth)
    fp32, tf32 = (refit.refine(x, y, weights, k, params, masks, 200, 1e-2, 512, 0, tf32=flag) for flag in (False, True))
    start, e32, e_tf = refit.nmse(y, output(params)), refit.nmse(y, output(fp32)), refit.nmse(y, output(tf32))
    assert e32 < 0.5 * start and e_tf == pytest.approx(e32, rel=0.05), (start, e32, e_tf)
    if torch.cuda.get_device_capability() >= (8, 0):
        assert not torch.equal(fp32["down"], tf32["down"])
