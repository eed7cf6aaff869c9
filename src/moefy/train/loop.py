"""The training loop. It reads top to bottom in a fixed order (torchtune/nanoGPT style): load the MoE and the data,
then for each stage: choose what trains, wrap the gates, build optimizer and schedule, and step; evaluate and update
domain weights every `eval_every` steps; checkpoint every `checkpoint_every` steps. A resumed run restores every
piece of state and continues the exact same sequence of batches and losses."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from moefy.atomic import atomic_output
from moefy.data.corpus import Corpus
from moefy.errors import MoefyError
from moefy.evaluate.perplexity import heldout_perplexity
from moefy.export.verify import load_causal_lm
from moefy.progress import progress
from moefy.recipes import dump_recipe
from moefy.sources import SIDE_FILES
from moefy.train.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from moefy.train.data import DomainSampler
from moefy.train.gating import GatingWrapper
from moefy.train.mixture import initial_weights, sheared_llama_update
from moefy.train.recipe import Stage, TrainRecipe
from moefy.train.trainable import select_trainable

METRICS = "metrics.jsonl"
MOE_SIDE_FILES = ("moefy_plan.json", "moefy_plan.safetensors", "moefy.yaml")


def cosine_with_floor(stage: Stage):
    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress_ = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))
    return factor


def reference_losses(dense_dir: Path, tokenizer, heldout: Corpus, stage: Stage, cache: Path) -> dict[str, float]:
    """Per-domain held-out loss of the dense source: Sheared-LLaMA's L_ref, measured once and cached in the run."""
    if cache.is_file():
        return json.loads(cache.read_text())
    ppl = heldout_perplexity(load_causal_lm(dense_dir), tokenizer, heldout, stage.seq_len,
                             stage.mixture.eval_tokens_per_domain)
    cache.write_text(json.dumps(ppl.per_domain))
    return ppl.per_domain


def train(moe_dir: Path, recipe: TrainRecipe, corpus: Corpus, heldout: Corpus, run: Path, dense_dir: Path | None,
          resume: bool = False) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    model = load_causal_lm(moe_dir)
    model.train()
    torch.manual_seed(recipe.seed)
    metrics = run / METRICS
    ckpt = load_checkpoint(latest_checkpoint(run)) if resume and latest_checkpoint(run) else None
    if ckpt:
        model.load_state_dict(ckpt["weights"], strict=False)
        # A run killed after its last checkpoint logged steps that will now be redone: drop them.
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= ckpt["step"]]
        metrics.write_text("".join(line + "\n" for line in kept))
    elif metrics.exists():
        metrics.unlink()
    step = ckpt["step"] if ckpt else 0
    for s_idx, stage in enumerate(recipe.stages):
        if ckpt and s_idx < ckpt["stage"]:
            continue
        sampler = DomainSampler(corpus, tokenizer, stage.seq_len, initial_weights(stage.mixture, corpus.domains()),
                                recipe.seed + s_idx)
        params = [p for _, p in select_trainable(model, stage.trainable)]
        gating = GatingWrapper(model, stage.gating)
        optimizer = torch.optim.AdamW(params + gating.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_floor(stage))
        start = 0
        if ckpt and s_idx == ckpt["stage"]:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            sampler.load_state(ckpt["sampler"])
            gating.load_state(ckpt["gating"])
            restore_rng(ckpt)
            start = ckpt["stage_step"]
        ckpt = None
        ref = None
        if stage.mixture.dynamic:
            if dense_dir is None:
                raise MoefyError("a dynamic mixture needs the dense source model for reference losses")
            ref = reference_losses(dense_dir, tokenizer, heldout, stage, run / f"reference_loss_{stage.seq_len}.json")
        for stage_step in progress(range(start, stage.steps), f"stage {stage.name} ({stage.trainable})",
                                   total=stage.steps - start):
            t0 = time.perf_counter()
            lm_total = aux_total = 0.0
            for _ in range(stage.grad_accum):
                ids, _domains = sampler.next_batch(stage.batch_size)
                lm = model(input_ids=ids, labels=ids).loss
                aux = gating.aux_loss()
                ((lm + aux) / stage.grad_accum).backward()
                lm_total += lm.item() / stage.grad_accum
                aux_total += float(aux.detach()) / stage.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            gate_stats = gating.end_step()
            step += 1
            record = {"step": step, "stage": stage.name, "loss": lm_total, "aux_loss": aux_total,
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "tokens_per_s": stage.tokens_per_step / (time.perf_counter() - t0),
                      "weights": dict(sampler.weights), "domain_epochs": dict(sampler.epochs), **gate_stats}
            if ref is not None and (stage_step + 1) % stage.mixture.eval_every == 0:
                model.eval()
                current = heldout_perplexity(model, tokenizer, heldout, stage.seq_len,
                                             stage.mixture.eval_tokens_per_domain).per_domain
                gating.records.clear()
                model.train()
                sampler.weights = sheared_llama_update(sampler.weights, current, ref, stage.mixture.eta,
                                                       stage.mixture.smoothing)
                record["eval_loss"] = current
            with open(metrics, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if step % recipe.checkpoint_every == 0:
                trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
                save_checkpoint(run, step, stage=s_idx, stage_step=stage_step + 1, model_state=trainable,
                                gating_state=gating.state(), optimizer=optimizer, scheduler=scheduler,
                                sampler_state=sampler.state(), keep_last=recipe.keep_last)
        gating.remove()
    return export(model, moe_dir, run, recipe)


def export(model, moe_dir: Path, run: Path, recipe: TrainRecipe) -> Path:
    """The trained model in the same standard format build wrote, plus the plan and the training recipe."""
    final = run / "final"
    with atomic_output(final, overwrite=True) as tmp:
        model.eval()
        model.save_pretrained(tmp)
        for name in (*SIDE_FILES, *MOE_SIDE_FILES):
            if (moe_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(moe_dir / name, tmp / name)
        dump_recipe(recipe, tmp / "moefy_train.yaml")
    return final
