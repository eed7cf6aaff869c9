"""The training loop. It reads top to bottom in a fixed order (torchtune/nanoGPT style): load the MoE and the data,
then for each stage: attach LoRA if the stage asks for it, choose what trains, wrap the gates, build optimizer and
schedule, hand model and optimizer to accelerate (DDP/FSDP across processes, as is for one), and step;
evaluate and update domain weights every `eval_every` steps; checkpoint every `checkpoint_every` steps; merge LoRA
at the end of its stage. A resumed run restores every piece of state and continues the same batches and losses.

Data parallelism keeps the global batch of the recipe: every process draws the same global micro-batch (same
sampler, same seed) and trains on its own rows of it, so N processes reproduce one process to rounding."""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from moefy.atomic import atomic_output
from moefy.construct.plan import PLAN_JSON, PLAN_TENSORS
from moefy.data.corpus import Corpus
from moefy.errors import MoefyError
from moefy.export.checkpoint import write_model
from moefy.host_memory import reuse_freed_blocks
from moefy.models import DTYPES, load_causal_lm, load_tokenizer, stored_dtype
from moefy.profile.perplexity import heldout_perplexity
from moefy.progress import progress
from moefy.recipes import BUILD_RECIPE, TRAIN_RECIPE, dump_recipe
from moefy.seeding import derived_seed
from moefy.sources import SIDE_FILES, read_config
from moefy.tensor_writer import SHARD_BYTES
from moefy.train import sharding
from moefy.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moefy.train.data import DomainSampler
from moefy.train.distill import distill_loss, load_teacher, logged_lm_loss
from moefy.train.frozen import keep_stored, load_frozen, release
from moefy.train.gating import NOISE_MODULE, GatingWrapper
from moefy.train.logs import RunLog
from moefy.train.lora import add_lora, merge, stable_name
from moefy.train.mixture import initial_weights, sheared_llama_update
from moefy.train.recipe import Stage, TrainRecipe
from moefy.train.trainable import matching, matching_names, select_trainable

MOE_SIDE_FILES = (PLAN_JSON, PLAN_TENSORS, BUILD_RECIPE)


def cosine_with_floor(stage: Stage):
    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress_ = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))
    return factor


def reference_losses(dense_dir: Path, tokenizer, heldout: Corpus, stage: Stage, cache: Path, device: torch.device,
                     frozen_dtype: str) -> dict[str, float]:
    """Per-domain held-out loss of the dense source: Sheared-LLaMA's L_ref, measured once and cached in the run."""
    if cache.is_file():
        return json.loads(cache.read_text())
    ppl = heldout_perplexity(load_frozen(dense_dir, device, frozen_dtype), tokenizer, heldout, stage.seq_len,
                             stage.mixture.eval_tokens_per_domain)
    cache.write_text(json.dumps(ppl.per_domain))
    return ppl.per_domain


def make_accelerator(recipe: TrainRecipe):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one state per process; a second run in the same process (the Python API, the tests) may ask
    # for another precision. The process group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    gpu = torch.cuda.is_available()
    precision = recipe.mixed_precision
    if precision == "auto":
        precision = "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=not gpu, mixed_precision=precision)


@dataclass
class StageRun:
    """One stage, set up: its data, what trains, the gate wrapper, the optimizer, and where it starts."""

    index: int
    stage: Stage
    sampler: DomainSampler
    lora: object | None  # the peft model while an experts-lora stage trains
    chosen: list  # (name, parameter) pairs that train
    gating: GatingWrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start: int  # the first step of this stage to run (past the checkpoint's on resume)
    reference: dict[str, float] | None  # dense per-domain losses, for a dynamic mixture
    frozen: list  # hooks of frozen weights kept in the MoE's dtype (frozen.keep_stored), removed at the end


def train(moe_dir: Path, recipe: TrainRecipe, corpus: Corpus, heldout: Corpus, run: Path, dense_dir: Path | None,
          resume: bool = False) -> Path:
    acc = make_accelerator(recipe)
    sharding.check_supported(acc)
    fsdp = sharding.is_fsdp(acc)
    tokenizer = load_tokenizer(moe_dir)
    model = load_model(moe_dir, recipe, acc.device)
    teacher = load_teacher(dense_dir, acc.device, recipe.frozen_dtype) if any(s.distill for s in recipe.stages) else None
    ckpt = load_checkpoint(latest_checkpoint(run)) if resume and latest_checkpoint(run) else None
    log = RunLog(run, ckpt["step"] if ckpt else None) if acc.is_main_process else None
    step = ckpt["step"] if ckpt else 0
    touched: set[str] = set(ckpt["touched"]) if ckpt else set()  # weights changed by finished stages
    # Frozen weights kept as stored are upcast in every forward: reuse the freed float32 copies (host_memory).
    with reuse_freed_blocks() if recipe.frozen_dtype == "source" else nullcontext():
        for s_idx, stage in enumerate(recipe.stages):
            if ckpt and s_idx < ckpt["stage"]:
                continue
            resuming = ckpt if ckpt and s_idx == ckpt["stage"] else None
            sr = setup_stage(model, recipe, s_idx, corpus, heldout, tokenizer, run, dense_dir, acc, resuming)
            ckpt = None
            # Only the model and optimizer go through accelerate: a prepared scheduler would step once per process.
            wrapped, sr.optimizer = acc.prepare(model, sr.optimizer)
            if fsdp and resuming:  # the optimizer's shards exist only now
                sharding.load_optimizer(wrapped, sr.optimizer, resuming["optimizer"])
            status: dict[str, str] = {}
            steps = range(sr.start, stage.steps)
            if acc.is_main_process:
                steps = progress(steps, f"{stage.name} ({stage.trainable})", status=status)
            for stage_step in steps:
                t0 = time.perf_counter()
                # The step's draws (gate noise) are seeded by its place and its process: independent across
                # processes, as within one process's batch, and the same after a resume with no RNG state saved
                # (manual_seed seeds every device).
                torch.manual_seed(derived_seed(recipe.seed, s_idx, stage_step, acc.process_index))
                record = train_step(acc, wrapped, sr, teacher)
                step += 1
                record = {"step": step, "stage": stage.name, **record,
                          "tokens_per_s": stage.tokens_per_step / (time.perf_counter() - t0),
                          "weights": dict(sr.sampler.weights), "domain_epochs": dict(sr.sampler.epochs)}
                if sr.reference is not None and (stage_step + 1) % stage.mixture.eval_every == 0:
                    record["eval_loss"] = update_mixture(model, tokenizer, heldout, sr)
                status.update(loss=f"{record['loss']:.3f}", aux=f"{record['aux_loss']:.4f}",
                              tok_s=f"{record['tokens_per_s']:.0f}")
                if log:
                    log.write(record)
                if step % recipe.checkpoint_every == 0:
                    gathered = sharding.gather_for_checkpoint(wrapped, sr.optimizer) if fsdp else None  # every process
                    if acc.is_main_process:
                        checkpoint(run, recipe, model, sr, step, stage_step + 1, touched, gathered)
                    acc.wait_for_everyone()
            if fsdp:  # a plain copy takes the gathered weights, each in its dtype (trained ones are float32)
                model = load_model(moe_dir, recipe, acc.device)
                if sr.lora is not None:  # the gathered weights carry peft's names: wrap the plain copy alike to merge
                    sr.lora = add_lora(model, stage.lora)
                load_weights(model, sharding.gathered_weights(wrapped))
            else:
                model = acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
            acc.free_memory()
            model, touched = finish_stage(model, sr, touched)
    if log:
        log.close()
    final = export(model, moe_dir, run, recipe) if acc.is_main_process else run / "final"
    acc.wait_for_everyone()
    return final


def load_model(moe_dir: Path, recipe: TrainRecipe, device):
    model = load_causal_lm(moe_dir, None if recipe.frozen_dtype == "source" else torch.float32).to(device)
    if model._can_set_experts_implementation():
        # grouped_mm by name: transformers then raises rather than silently falling back (batched_mm computes every
        # expert for every token, which training would pay in forward and backward).
        model.set_experts_implementation("grouped_mm")
    if recipe.gradient_checkpointing:
        # A recomputation that stops early would skip frozen.py's hooks that swap LoRA-wrapped experts back to
        # their stored dtype; run it to the end of each layer there.
        early_stop = recipe.frozen_dtype == "float32"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                           "early_stop": early_stop})
    model.train()
    return model


def setup_stage(model, recipe: TrainRecipe, s_idx: int, corpus: Corpus, heldout: Corpus, tokenizer, run: Path,
                dense_dir: Path | None, acc, ckpt: dict | None) -> StageRun:
    """Data, LoRA, trainable set, gate wrapper, optimizer and schedule for one stage; restored from `ckpt` when
    the run resumes inside this stage."""
    stage = recipe.stages[s_idx]
    if stage.batch_size % acc.num_processes:
        raise MoefyError(f"stage {stage.name}: batch_size {stage.batch_size} must be a multiple of the "
                         f"{acc.num_processes} processes (the global batch is split across them)")
    sampler = DomainSampler(corpus, tokenizer, stage.seq_len, initial_weights(stage.mixture, corpus.domains()),
                            recipe.seed + s_idx)
    torch.manual_seed(derived_seed(recipe.seed, s_idx))  # the same on every process: LoRA's initial weights
    lora = add_lora(model, stage.lora) if stage.trainable == "experts-lora" else None
    chosen = select_trainable(model, stage.trainable)
    if ckpt is not None:
        if ckpt["sharded"] != sharding.is_fsdp(acc):
            raise MoefyError("this checkpoint was written " + ("under FSDP; resume it under FSDP too" if ckpt["sharded"]
                             else "without FSDP; resume it without FSDP too"))
        load_weights(model, ckpt["weights"])
    # After the resume's weights (an earlier stage's float32 norms come back float32), before the optimizer.
    frozen = keep_stored(model) if recipe.frozen_dtype == "source" else []
    gating = GatingWrapper(model, stage.gating)
    optimizer = torch.optim.AdamW(param_groups(chosen, gating.parameters(), stage), lr=stage.lr,
                                  weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_floor(stage))
    start = 0
    if ckpt is not None:
        if not ckpt["sharded"]:  # under FSDP the optimizer state goes into its shards after accelerate.prepare
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        sampler.load_state(ckpt["sampler"])
        gating.load_state(ckpt["gating"])
        start = ckpt["stage_step"]
    reference = None
    if stage.mixture.dynamic:
        if dense_dir is None:
            raise MoefyError("a dynamic mixture needs the dense source model for reference losses")
        reference = reference_losses(dense_dir, tokenizer, heldout, stage, run / f"reference_loss_{stage.seq_len}.json",
                                     acc.device, recipe.frozen_dtype)
    return StageRun(s_idx, stage, sampler, lora, chosen, gating, optimizer, scheduler, start, reference, frozen)


def train_step(acc, wrapped, sr: StageRun, teacher) -> dict:
    """One optimizer step over grad_accum micro-batches; the step's losses (means over processes) and gate stats."""
    stage = sr.stage
    totals = torch.zeros(3)  # lm loss, aux loss, distillation loss: means over micro-batches
    for micro in range(stage.grad_accum):
        ids, _domains = sr.sampler.next_batch(stage.batch_size)
        ids = ids[acc.process_index::acc.num_processes].to(acc.device)
        last = micro == stage.grad_accum - 1
        with nullcontext() if last else acc.no_sync(wrapped):  # gradients are all-reduced once per step
            hidden = stage.distill is not None and stage.distill.hidden_weight > 0
            log_only = stage.distill is not None and stage.distill.lm_weight == 0  # the LM loss is only logged
            with sr.gating.recorded():
                out = wrapped(input_ids=ids, labels=None if log_only else ids, output_hidden_states=hidden)
            aux, kd = sr.gating.aux_loss(), torch.zeros(())
            if stage.distill is None:
                lm = loss = out.loss
            else:
                kd = distill_loss(teacher, ids, out, stage.distill)
                lm = logged_lm_loss(out.logits, ids) if log_only else out.loss
                loss = kd if log_only else stage.distill.lm_weight * lm + kd
            acc.backward((loss + aux) / stage.grad_accum)
        totals += torch.stack([v.detach().float().cpu() for v in (lm, aux, kd)]) / stage.grad_accum
    grad_norm = acc.clip_grad_norm_(wrapped.parameters(), stage.clip)
    sr.optimizer.step()
    sr.scheduler.step()
    sr.optimizer.zero_grad(set_to_none=True)
    gate_stats = sr.gating.end_step(lambda load: acc.reduce(load.to(acc.device), "sum").cpu())
    lm_loss, aux_loss, kd_loss = acc.reduce(totals.to(acc.device), "mean").tolist()
    return {"loss": lm_loss, "aux_loss": aux_loss, **({"distill_loss": kd_loss} if stage.distill is not None else {}),
            "lr": sr.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), **gate_stats}


def update_mixture(model, tokenizer, heldout: Corpus, sr: StageRun) -> dict[str, float]:
    """Sheared-LLaMA's dynamic weights: held-out loss per domain, then the update towards the lagging domains."""
    stage = sr.stage
    model.eval()  # every process evaluates the same data, so every process moves its weights the same
    current = heldout_perplexity(model, tokenizer, heldout, stage.seq_len,
                                 stage.mixture.eval_tokens_per_domain).per_domain
    model.train()
    sr.sampler.weights = sheared_llama_update(sr.sampler.weights, current, sr.reference, stage.mixture.eta,
                                              stage.mixture.smoothing)
    return current


def checkpoint(run: Path, recipe: TrainRecipe, model, sr: StageRun, step: int, stage_step: int,
               touched: set[str], gathered: tuple[dict, dict] | None = None) -> None:
    """What a resume needs: the trainable (and earlier-touched) weights, optimizer, schedule, sampler, gate.
    `gathered`: under FSDP, the full weights and optimizer state (keyed by parameter name) from the shards."""
    params, optimizer_state = gathered or (dict(model.named_parameters()), sr.optimizer.state_dict())
    trainable = {n for n, _ in sr.chosen}
    weights = {stable_name(n): p for n, p in params.items()
               if (n in trainable or stable_name(n) in touched) and NOISE_MODULE not in n}
    gating_state = sr.gating.state(params if gathered else None)
    save_checkpoint(run, step, stage=sr.index, stage_step=stage_step, weights=weights,
                    gating_state=gating_state, optimizer_state=optimizer_state, sharded=gathered is not None,
                    scheduler=sr.scheduler, sampler_state=sr.sampler.state(), touched=sorted(touched),
                    keep_last=recipe.keep_last)


def finish_stage(model, sr: StageRun, touched: set[str]):
    """Unwrap the gates, merge LoRA into the weights, and record which weights the stage changed."""
    sr.gating.remove()
    release(model, sr.frozen)
    touched = touched | {stable_name(n) for n, _ in sr.chosen if "lora_" not in n}
    if sr.lora is not None:
        model = merge(sr.lora)
        touched |= set(matching(model, "experts"))  # the merged deltas changed the expert weights
    return model, touched


def param_groups(chosen: list, extra: list, stage: Stage) -> list[dict]:
    """One group at the stage's lr; with `router_lr_ratio`, each router is its own group whose lr is that fraction
    of its weights' RMS. Adam's steps are about lr per element whatever the weight's size, so a fitted router
    (RMS ~5e-4 on SmolLM2) is scrambled by any lr that suits norms or LoRA; a relative lr moves every router by
    the same share of itself."""
    routers = set(matching_names([n for n, _ in chosen], "router")) if stage.router_lr_ratio else set()
    rest = [p for n, p in chosen if n not in routers] + extra
    # Only matrices decay (nanoGPT's configure_optimizers): norms and biases are scales and offsets, not capacity.
    groups = [{"params": [p for p in rest if p.dim() >= 2]},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    for n, p in chosen:
        if n in routers:
            rms = float(p.detach().float().pow(2).mean().sqrt())
            groups.append({"params": [p], "lr": stage.router_lr_ratio * max(rms, 1e-8)})
    return groups


def load_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    """The checkpoint's weights into the model, each in the checkpoint's dtype: with frozen weights kept in the
    MoE's dtype, what an earlier stage trained was float32 and comes back float32."""
    params = {stable_name(n): p for n, p in model.named_parameters()}
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise MoefyError(f"checkpoint does not match this model: no parameter {missing[0]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].dtype == value.dtype:
                params[name].copy_(value)
            else:
                params[name].data = value.to(params[name].device)


def export(model, moe_dir: Path, run: Path, recipe: TrainRecipe) -> Path:
    """The trained model in the same standard format build wrote, in the MoE's dtype unless the recipe names
    another, plus the plan and the training recipe."""
    final = run / "final"
    dtype = stored_dtype(read_config(moe_dir)) if recipe.dtype == "source" else DTYPES[recipe.dtype]
    with atomic_output(final, overwrite=True) as tmp:
        model.eval()
        write_model(model, tmp, dtype, SHARD_BYTES)
        for name in (*SIDE_FILES, *MOE_SIDE_FILES):
            if (moe_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(moe_dir / name, tmp / name)
        dump_recipe(recipe, tmp / TRAIN_RECIPE)
    return final
