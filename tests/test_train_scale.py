"""Training features beyond the loop itself: LoRA on fused experts (merged exactly at export), presets, mixed
precision, gradient checkpointing, TensorBoard logs, and data parallelism over 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from conftest import write_domain_corpus

from moefy import api
from moefy.construct.recipe import BuildRecipe
from moefy.errors import MoefyError
from moefy.models import load_causal_lm
from moefy.recipes import validate_recipe
from moefy.train.checkpoint import latest_checkpoint
from moefy.train.frozen import keep_stored, release
from moefy.train.lora import add_lora, merge
from moefy.train.recipe import Lora, TrainRecipe
from moefy.train.trainable import select_trainable

DOMAINS = {"alpha": "ab ", "digits": "0123 "}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_domain_corpus(tmp_path_factory.mktemp("scale") / "c.jsonl", DOMAINS, {"alpha": 8, "digits": 8},
                               {"alpha": 150, "digits": 150}, seed=5)


@pytest.fixture(scope="module")
def tiny_qwen_moe(tiny_llama, corpus, tmp_path_factory):
    """A Qwen2-MoE output: carve keeps always-on shared neurons (random ignores shared_fraction, so it writes Mixtral)."""
    out = tmp_path_factory.mktemp("qwen") / "moe"
    api.build(validate_recipe(BuildRecipe, {"model": str(tiny_llama), "experts": 4, "top_k": 2, "method": "carve",
                                            "shared_fraction": 0.25, "calib": str(corpus)}), out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    return out


@pytest.fixture
def cpu_only(monkeypatch):
    """The multi-process tests run on gloo processes on the CPU, GPU or not: the in-process baseline is kept off a
    GPU too (else it would compute in bf16), and the launched processes get no GPU (env below)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return {**os.environ, "MOEFY_QUIET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def run_recipe(moe, corpus, path, stages, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe = path.with_suffix(".yaml")
    recipe.write_text(yaml.safe_dump({"stages": stages, **extra}))
    final = api.train(moe, str(corpus), recipe, path)
    return final, [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("moe", ["tied", "tiny_qwen_moe"])
def test_streamed_export_writes_what_save_pretrained_writes(moe, request, tmp_path):
    """Train's export streams the model one decoder layer at a time. It must write save_pretrained's checkpoint: the
    same names, dtypes and bits, fused experts split back per expert (Qwen2-MoE's shared expert too), tied
    embeddings once, the same config, here over several shards."""
    from conftest import make_tiny_llama
    from transformers import AutoModelForCausalLM

    from moefy.export.checkpoint import write_model

    if moe == "tied":
        src = make_tiny_llama(tmp_path / "src", tie_word_embeddings=True)
        api.build(validate_recipe(BuildRecipe, {"model": str(src), "experts": 4, "top_k": 2, "method": "random"}),
                  tmp_path / "moe")
        moe = tmp_path / "moe"
    else:
        moe = request.getfixturevalue(moe)
    model = AutoModelForCausalLM.from_pretrained(moe)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    write_model(model, ours, torch.bfloat16, max_shard_bytes=20_000)
    model.to(torch.bfloat16).save_pretrained(theirs)
    index = json.loads((ours / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    written = {n: t for f in sorted(set(index.values())) for n, t in load_file(ours / f).items()}
    expected = load_file(theirs / "model.safetensors")
    assert sorted(written) == sorted(expected) == sorted(index)
    assert model.config.tie_word_embeddings == ("lm_head.weight" not in written)
    assert all(written[n].dtype == t.dtype and torch.equal(written[n], t) for n, t in expected.items())
    for name in ("config.json", "generation_config.json"):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text())
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(ours)(ids).logits,
                           AutoModelForCausalLM.from_pretrained(theirs)(ids).logits)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_moe", "tiny_qwen_moe"])
def test_float32_load_of_a_bf16_checkpoint_is_transformers_own(model, request, tmp_path, monkeypatch):
    """load_causal_lm upcasts a bf16 checkpoint after loading it as stored (to lower the load's peak); the model must
    be the one transformers loads in float32: every parameter and buffer, the config's dtype, the logits."""
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(request.getfixturevalue(model), dtype=torch.bfloat16).save_pretrained(bf16)
    theirs = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    asked, load = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: asked.append(k["dtype"]) or load(*a, **k))
    ours = load_causal_lm(bf16)
    assert asked == [torch.bfloat16]
    assert ours.config.dtype == theirs.config.dtype == torch.float32
    for kind in ("named_parameters", "named_buffers"):
        a, b = dict(getattr(ours, kind)()), dict(getattr(theirs, kind)())
        assert sorted(a) == sorted(b)
        assert all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in b), kind
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("moe", ["tiny_moe", "tiny_qwen_moe"])
def test_lora_merge_is_exact(moe, request):
    """Adapters with non-zero B change the function; merging keeps exactly that function in the stock classes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(moe)).eval()
    ids = torch.randint(0, 200, (2, 24))
    base = model(ids).logits
    wrapped = add_lora(model, Lora(rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapted = model(ids).logits
    merged = merge(wrapped)
    assert type(merged).__name__ in ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_experts_lora_stage_exports_merged_weights(tiny_moe, corpus, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    final, recs = run_recipe(tiny_moe, corpus, tmp_path / "run", [
        {"trainable": "experts-lora", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2, "lora": {"rank": 2}}])
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert not any("lora" in k or "base_layer" in k for k in f.keys())
    before, after = (AutoModelForCausalLM.from_pretrained(p) for p in (tiny_moe, final))
    e0, e1 = before.model.layers[0].mlp.experts, after.model.layers[0].mlp.experts
    delta = e1.gate_up_proj - e0.gate_up_proj
    assert delta.abs().max() > 0
    # LoRA's delta for each expert has rank ≤ 2
    assert all(torch.linalg.matrix_rank(delta[e]) <= 2 for e in range(delta.shape[0]))
    assert not torch.equal(after.model.layers[0].mlp.gate.weight, before.model.layers[0].mlp.gate.weight)
    assert torch.equal(after.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert (tmp_path / "run" / "tensorboard").is_dir() and any((tmp_path / "run" / "tensorboard").iterdir())


def test_gradient_checkpointing_and_bf16(tiny_moe, corpus, tmp_path):
    # Balance and z-losses on: backward's recomputation calls the routers again, and those calls must not count.
    stage = {"trainable": "experts", "tokens": 3 * 4 * 32, "seq_len": 32, "lr": 1e-3,
             "gating": {"balance": "cv", "z_loss_coef": 1e-3}}
    # fp32 named: on a GPU, mixed_precision "auto" is bf16 already
    _, plain = run_recipe(tiny_moe, corpus, tmp_path / "plain", [stage], mixed_precision="no")
    _, ckpt = run_recipe(tiny_moe, corpus, tmp_path / "ckpt", [stage], gradient_checkpointing=True,
                         mixed_precision="no")
    _, bf16 = run_recipe(tiny_moe, corpus, tmp_path / "bf16", [stage], mixed_precision="bf16")
    for a, b, c in zip(plain, ckpt, bf16):
        for key in ("loss", "aux_loss", "load_cv"):  # recomputation changes memory, not numbers
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a["step"])
        assert a["loss"] == pytest.approx(c["loss"], abs=0.05) and a["loss"] != c["loss"]  # autocast was on


def test_frozen_weights_kept_bf16_train_as_float32(tiny_llama, corpus, tmp_path, monkeypatch):
    """A bf16 MoE whose frozen weights stay bf16 (upcast as each layer runs) takes the float32-loaded run's steps bit
    for bit: across stage boundaries (stage r's trained norms stay float32 while frozen), through LoRA on the fused
    experts and its merge (whose sums stay bf16 and frozen in stage g), and across a resume in stage g."""
    moe = tmp_path / "moe"
    api.build(validate_recipe(BuildRecipe, {"model": str(tiny_llama), "experts": 4, "top_k": 2, "method": "random",
                                            "dtype": "bfloat16"}), moe)
    stages = [{"name": "r", "trainable": "router+norm", "tokens": 3 * 4 * 32, "seq_len": 32, "lr": 1e-2},
              {"name": "l", "trainable": "experts-lora", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2},
              {"name": "g", "trainable": "router", "tokens": 3 * 4 * 32, "seq_len": 32, "lr": 1e-2}]
    common = {"gradient_checkpointing": True, "mixed_precision": "no", "checkpoint_every": 2, "keep_last": 5}
    _, kept = run_recipe(moe, corpus, tmp_path / "kept", stages, frozen_dtype="source", **common)

    # Two roundings differ by design: peft draws the LoRA init in float32 and stores it through the base weight's
    # dtype, and a merged weight kept bf16 is rounded once. The float32 run gets both, so only the arithmetic is
    # compared.
    def rounded(model, contains: str) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if contains in name:
                    param.copy_(param.bfloat16().float())

    def bf16_init(model, options):
        peft_model = add_lora(model, options)
        rounded(model, "lora_A")
        return peft_model

    def bf16_merge(peft_model):
        model = merge(peft_model)
        rounded(model, ".mlp.experts.")
        return model

    monkeypatch.setattr("moefy.train.loop.add_lora", bf16_init)
    monkeypatch.setattr("moefy.train.loop.merge", bf16_merge)
    _, full = run_recipe(moe, corpus, tmp_path / "float32", stages, **common)
    assert [r["loss"] for r in kept] == [r["loss"] for r in full] and len(kept) == 10
    w_full, w_kept = (load_file(str(tmp_path / p / "final" / "model.safetensors")) for p in ("float32", "kept"))
    assert w_kept["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16  # written in the MoE's dtype
    assert all(torch.equal(w_full[k], w_kept[k]) for k in w_full)
    monkeypatch.undo()

    # Resume at step 8, inside stage g, as if killed: stage r's float32 norms and stage l's bf16 merged experts
    # come back from the checkpoint.
    shutil.copytree(tmp_path / "kept", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "final")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000010")
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000008"
    api.train(None, None, None, tmp_path / "resumed", resume=True)
    w_resumed = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(w_kept[k], w_resumed[k]) for k in w_kept)
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in kept]

    # In memory the frozen weights stay bf16, and release() hands back plain parameters.
    model = load_causal_lm(moe, torch.bfloat16)
    peft_model = add_lora(model, Lora())
    select_trainable(model, "experts-lora")
    handles = keep_stored(model)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.parametrizations.weight.original.dtype == torch.bfloat16
    assert layer.self_attn.q_proj.weight.dtype == layer.mlp.gate.weight.dtype == torch.float32
    experts = layer.mlp.experts.get_base_layer()
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.bfloat16
    model(input_ids=torch.tensor([[1, 2, 3]]))  # the LoRA-wrapped experts run in float32 and are bf16 again after
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.bfloat16
    release(model, handles)
    assert isinstance(layer.self_attn.q_proj.weight, torch.nn.Parameter)
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert merge(peft_model).model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_teacher_and_reference_kept_in_their_stored_dtype(tiny_llama, corpus, tmp_path, cpu_only):
    """With frozen_dtype source, a bf16 dense source runs as teacher and as the dynamic mixture's reference from its
    bf16 weights, read as float32 on the CPU: its logits, the reference losses, and the whole run (KL and
    hidden-state terms) are the float32 teacher's bit for bit."""
    from transformers import AutoModelForCausalLM

    from moefy.train.frozen import load_frozen

    dense = tmp_path / "dense"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(dense)
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy(f, dense / f.name)
    cpu = torch.device("cpu")
    kept, full = load_frozen(dense, cpu, "source"), load_frozen(dense, cpu, "float32")
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(kept(ids).logits, full(ids).logits)

    moe = tmp_path / "moe"
    api.build(validate_recipe(BuildRecipe, {"model": str(dense), "experts": 4, "top_k": 1, "method": "random"}), moe)
    stage = {"trainable": "router+norm", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2,
             "distill": {"temperature": 2.0, "hidden_weight": 0.1},
             "mixture": {"dynamic": True, "eval_every": 2, "eval_tokens_per_domain": 64}}
    common = {"gradient_checkpointing": True, "mixed_precision": "no"}
    runs = {mode: run_recipe(moe, corpus, tmp_path / mode, [stage], frozen_dtype=mode, **common)[1]
            for mode in ("source", "float32")}
    for key in ("loss", "distill_loss", "eval_loss"):
        assert [r.get(key) for r in runs["source"]] == [r.get(key) for r in runs["float32"]], key
    reference = [(tmp_path / mode / "reference_loss_32.json").read_text() for mode in runs]
    assert reference[0] == reference[1] and runs["source"][-1]["distill_loss"] > 0


def test_frozen_dtype_source_needs_gradient_checkpointing():
    with pytest.raises(MoefyError, match="needs gradient_checkpointing"):
        validate_recipe(TrainRecipe, {"stages": [{"trainable": "router", "tokens": 1024}], "frozen_dtype": "source"})


def test_dive_preset():
    recipe = validate_recipe(TrainRecipe, {"preset": "dive", "tokens": [1024, 4096, 0], "seq_len": 32})
    assert [s.trainable for s in recipe.stages] == ["router", "experts-lora"]
    assert recipe.stages[0].gating.soft_temperature == 1.0 and recipe.stages[1].gating.soft_temperature is None
    assert [s.tokens for s in recipe.stages] == [1024, 4096]
    with pytest.raises(MoefyError, match="unknown training preset"):
        validate_recipe(TrainRecipe, {"preset": "nope"})
    with pytest.raises(MoefyError, match="Extra inputs"):
        validate_recipe(TrainRecipe, {"preset": "dive", "stages": []})


def test_two_processes_match_one(tiny_moe, corpus, tmp_path, cpu_only):
    """Same global batch: 2 gloo processes × 2 rows reproduce 1 process × 4 rows, step by step; a 2-process
    run resumes on 1 process (a job restarted on fewer GPUs) where it left off, and a 1-process run on 2.

    Routing is dense and soft here: with hard top-k, float differences of 1e-7 between batch shapes and thread counts
    can flip a near-tied expert choice, and the runs then part by a routing decision, not by a bug. Noise and balance
    losses are per process (as in Megatron and HF), so they match only in distribution."""
    soft = {"soft_temperature": 1.0}
    stages = [{"name": "r", "trainable": "router+norm", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2,
               "gating": soft},
              {"name": "e", "trainable": "experts-lora", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2,
               "grad_accum": 2, "batch_size": 2, "gating": soft, "distill": {"temperature": 2.0, "lm_weight": 0.5}}]
    final, one = run_recipe(tiny_moe, corpus, tmp_path / "one", stages, checkpoint_every=3)
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump({"stages": stages, "checkpoint_every": 3}))
    env = cpu_only
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moefy", "train", str(tiny_moe), "--data", str(corpus), "--recipe", str(recipe),
           "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(two) == len(one) == 8
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
        assert a.get("distill_loss", 0) == pytest.approx(b.get("distill_loss", 0), abs=1e-4), a["step"]
    w1, w2 = (load_file(str(p / "final" / "model.safetensors")) for p in (tmp_path / "one", tmp_path / "two"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)

    def resume_goes_on_as(run: str, on_two_processes: bool) -> None:
        """A copy of `run` resumed from its step-6 checkpoint, inside the LoRA stage, goes on as `run` did."""
        copy = tmp_path / f"{run}-resumed"
        shutil.copytree(tmp_path / run, copy)
        shutil.rmtree(copy / "final")
        assert latest_checkpoint(copy).name == "step-0000006"
        if on_two_processes:
            done = subprocess.run([*cmd[:cmd.index("train") + 1], "--resume", str(copy)], env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            api.train(None, None, None, copy, resume=True)
        straight, resumed = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                             for d in (tmp_path / run, copy))
        assert [r["loss"] for r in resumed[:6]] == [r["loss"] for r in straight[:6]]
        for a, b in zip(straight[6:], resumed[6:], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
        w, w_resumed = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / run, copy))
        for k in w:
            torch.testing.assert_close(w[k], w_resumed[k], atol=1e-4, rtol=1e-3)

    resume_goes_on_as("two", on_two_processes=False)  # a job restarted on fewer processes than it had
    resume_goes_on_as("one", on_two_processes=True)  # and on more


def test_bias_update_uses_the_load_summed_over_processes(tiny_moe):
    from transformers import AutoModelForCausalLM

    from moefy.train.gating import GatingWrapper
    from moefy.train.recipe import Gating

    gating = GatingWrapper(AutoModelForCausalLM.from_pretrained(tiny_moe), Gating(bias_update_rate=0.1))
    gating.loads = {0: torch.tensor([3.0, 1.0, 0.0, 0.0])}  # this process's counts
    other = torch.tensor([0.0, 0.0, 4.0, 0.0])  # the other process's, arriving through the all-reduce
    gating.end_step(lambda load: load + other)
    assert torch.equal(gating.bias[0], torch.tensor([-0.1, 0.1, -0.1, 0.1]))  # from [3, 1, 4, 0], mean 2


def test_router_lr_ratio_scales_each_router_by_its_own_size(tiny_moe):
    from transformers import AutoModelForCausalLM

    from moefy.train.loop import param_groups
    from moefy.train.recipe import Stage
    from moefy.train.trainable import select_trainable

    model = AutoModelForCausalLM.from_pretrained(tiny_moe)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight.mul_(100)
    chosen = select_trainable(model, "router+norm")
    groups = param_groups(chosen, [], Stage(tokens=64, seq_len=8, batch_size=8, lr=1e-3, router_lr_ratio=0.01))
    assert len(groups) == 3 and len(groups[0]["params"]) == len(chosen) - 2  # norms at lr; one group per router
    rms = [float(model.model.layers[i].mlp.gate.weight.detach().pow(2).mean().sqrt()) for i in (0, 1)]
    assert [g["lr"] for g in groups[1:]] == pytest.approx([0.01 * r for r in rms])
    plain = param_groups(chosen, [], Stage(tokens=64, seq_len=8, batch_size=8))  # only matrices decay (nanoGPT)
    assert [len(g["params"]) for g in plain] == [2, len(chosen) - 2] and plain[1]["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in plain[0]["params"]) and all(p.dim() == 1 for p in plain[1]["params"])


def test_fsdp2_two_processes_match_one_and_resume(tiny_moe, corpus, tmp_path, cpu_only):
    """FSDP2 (fully_shard through accelerate) on 2 gloo processes: same losses and weights as 1 process, across
    stage boundaries (the shards are gathered into a plain model between stages, LoRA's merged there), and a resume
    from a checkpoint inside the LoRA stage (full weights and name-keyed optimizer state, re-sharded) reproduces the
    straight run exactly."""
    from moefy.train.checkpoint import load_checkpoint

    soft = {"soft_temperature": 1.0}
    # No clipping: FSDP's sharded grad norm can come out one ulp apart in a resumed process (its partial norms
    # are summed in another order), and a clipped step scales every gradient by it, so the weights would part by
    # an ulp (seen intermittently). Unclipped, the resumed run is bit-exact.
    stages = [{"name": "r", "trainable": "router+norm", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2,
               "gating": soft, "clip": 1e9},
              {"name": "e", "trainable": "experts", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2, "gating": soft,
               "clip": 1e9},
              {"name": "l", "trainable": "experts-lora", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2,
               "gating": soft, "clip": 1e9}]
    _, one = run_recipe(tiny_moe, corpus, tmp_path / "one", stages, checkpoint_every=3, keep_last=5)
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(yaml.safe_dump({"stages": stages, "checkpoint_every": 3, "keep_last": 5}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(Path(__file__).parent / "fsdp_on_cpu.py")]
    env = cpu_only
    done = subprocess.run([*launcher, "train", str(tiny_moe), "--data", str(corpus), "--recipe", str(recipe),
                           "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(latest_checkpoint(tmp_path / "two"))["sharded"]  # the FSDP path, not DDP
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 13))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
    w1, w2 = (load_file(str(p / "final" / "model.safetensors")) for p in (tmp_path / "one", tmp_path / "two"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)

    # Resume from step 9 (inside the LoRA stage, after two FSDP stage boundaries), as if killed before the end.
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "final")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000012")
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000009"
    done = subprocess.run([*launcher, "train", "--resume", str(tmp_path / "resumed")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in two]
    w3 = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    # A sharded checkpoint cannot be resumed without FSDP (its optimizer state is keyed by name, not position).
    shutil.rmtree(tmp_path / "resumed" / "final")
    with pytest.raises(MoefyError, match="written under FSDP"):
        api.train(None, None, None, tmp_path / "resumed", resume=True)


def test_fsdp2_trains_gate_noise_and_resumes_it_exactly(tiny_moe, corpus, tmp_path, cpu_only):
    """Gate noise under FSDP2: the noise layers are sharded and trained like any weight, a checkpoint holds them
    whole (gathered, not a process's shard), a resume inside the noisy stage reproduces the straight run bit for bit
    (each step's noise is seeded by its place, not by a saved RNG state), and the plain model between stages drops
    them, so the next stage and the export are stock."""
    from moefy.train.checkpoint import load_checkpoint

    stages = [{"name": "n", "trainable": "router+norm", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2,
               "gating": {"noise": 1.0}, "clip": 1e9},  # unclipped: see the test above
              {"name": "r", "trainable": "router", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2, "clip": 1e9}]
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(yaml.safe_dump({"stages": stages, "checkpoint_every": 2, "keep_last": 5}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(Path(__file__).parent / "fsdp_on_cpu.py")]
    done = subprocess.run([*launcher, "train", str(tiny_moe), "--data", str(corpus), "--recipe", str(recipe),
                           "--out", str(tmp_path / "two")], env=cpu_only, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "two" / "checkpoints" / "step-0000002")
    final = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    routers = [w for name, w in final.items() if name.endswith(".gate.weight")]
    noise = [w for name, w in ckpt["gating"].items() if name.startswith("noise.")]
    assert ckpt["sharded"] and len(noise) == len(routers) > 0
    assert all(n.shape == r.shape and n.abs().sum() > 0 for n, r in zip(noise, routers))  # whole, and trained
    assert not any("noise" in name for name in final)

    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    for later in ("final", "checkpoints/step-0000004", "checkpoints/step-0000006", "checkpoints/step-0000008"):
        shutil.rmtree(tmp_path / "resumed" / later)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000002"  # inside the noisy stage
    done = subprocess.run([*launcher, "train", "--resume", str(tmp_path / "resumed")], env=cpu_only,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two, resumed = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                    for run in ("two", "resumed"))
    assert [r["step"] for r in two] == list(range(1, 9)) and [r["loss"] for r in resumed] == [r["loss"] for r in two]
    again = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_gate_noise_is_drawn_per_process(tiny_moe, corpus, tmp_path, cpu_only):
    """Each process draws its own gate noise, as the rows of one process's batch do: the same seed on every
    process gave every process the same draws (seen before the per-step seed)."""
    stages = [{"name": "n", "trainable": "router", "tokens": 2 * 4 * 32, "seq_len": 32, "gating": {"noise": 1.0}}]
    recipe = tmp_path / "noise.yaml"
    recipe.write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "draws").mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).parent / "gate_noise_draws.py"), "train", str(tiny_moe), "--data",
                           str(corpus), "--recipe", str(recipe), "--out", str(tmp_path / "two")],
                          env={**cpu_only, "NOISE_DRAWS": str(tmp_path / "draws")}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [(tmp_path / "draws" / f"rank-{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2 * 2  # 2 steps × 2 MoE layers
    assert all(a != b for a, b in zip(*ranks)) and len(set(ranks[0])) == len(ranks[0])


def test_fsdp2_keeps_frozen_weights_bf16_as_one_process_does(tiny_llama, corpus, tmp_path, cpu_only):
    """`frozen_dtype: source` under FSDP2: a bf16 MoE's frozen weights are sharded in bf16 beside the float32 ones that
    train, through a LoRA stage and its merge, with the same losses and weights as one process; a resume inside the
    LoRA stage repeats the straight run bit for bit."""
    moe = tmp_path / "moe"
    api.build(validate_recipe(BuildRecipe, {"model": str(tiny_llama), "experts": 4, "top_k": 2, "method": "random",
                                            "dtype": "bfloat16"}), moe)
    soft = {"soft_temperature": 1.0}
    stages = [{"name": "r", "trainable": "router+norm", "tokens": 3 * 4 * 32, "seq_len": 32, "lr": 1e-2,
               "gating": soft, "clip": 1e9},  # unclipped: see test_fsdp2_two_processes_match_one_and_resume
              {"name": "l", "trainable": "experts-lora", "tokens": 4 * 4 * 32, "seq_len": 32, "lr": 1e-2,
               "gating": soft, "clip": 1e9},
              {"name": "g", "trainable": "router", "tokens": 3 * 4 * 32, "seq_len": 32, "lr": 1e-2, "gating": soft,
               "clip": 1e9}]
    common = {"frozen_dtype": "source", "gradient_checkpointing": True, "mixed_precision": "no",
              "checkpoint_every": 2, "keep_last": 10}
    _, one = run_recipe(moe, corpus, tmp_path / "one", stages, **common)
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(yaml.safe_dump({"stages": stages, **common}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(Path(__file__).parent / "fsdp_on_cpu.py")]
    done = subprocess.run([*launcher, "train", str(moe), "--data", str(corpus), "--recipe", str(recipe),
                           "--out", str(tmp_path / "two")], env=cpu_only, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 11))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
    w1, w2 = (load_file(str(tmp_path / p / "final" / "model.safetensors")) for p in ("one", "two"))
    assert w2["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    for k in w1:  # a bf16 weight may round one ulp (2^-8 relative) apart
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-2)

    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    for later in ("final", "checkpoints/step-0000008", "checkpoints/step-0000010"):
        shutil.rmtree(tmp_path / "resumed" / later)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000006"  # inside the LoRA stage (steps 4-7)
    done = subprocess.run([*launcher, "train", "--resume", str(tmp_path / "resumed")], env=cpu_only,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in two]
    again = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(w2[k], again[k]) for k in w2)


def test_deepspeed_is_refused_before_the_run_exists(tiny_moe, corpus, tmp_path, monkeypatch, capsys):
    """Under DeepSpeed a 2-process ZeRO-2 run parted from one process and did not resume (scratch run on gloo), so
    `moefy train` refuses it in one line, before it writes anything."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import moefy.train.loop as loop
    from moefy.cli import main

    monkeypatch.setattr(loop, "make_accelerator", lambda recipe: SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"trainable": "router", "tokens": 256, "seq_len": 32}]}))
    assert main(["train", str(tiny_moe), "--data", str(corpus), "--recipe", str(recipe),
                 "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DeepSpeed is not supported" in err[0]
    assert not (tmp_path / "run").exists()

