"""The training recipe: one or more stages, each saying what trains, how the gate behaves, the data mixture, the
optimiser and schedule, and the token budget. Frozen pydantic; unknown keys are errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from moefy.construct.recipe import DTypeName, ReconstructOptions
from moefy.data.filtering import FilterRecipe
from moefy.errors import MoefyError
from moefy.recipes import Frozen, deep_merge, read_recipe, validate_recipe
from moefy.train.presets import PRESETS, expand_preset

Trainable = Literal["norm", "router", "router+norm", "experts-lora", "experts", "all"]

# Static domain-weight presets (DESIGN §5). They name RedPajama's domains, so they apply to corpora that use them.
DOMAIN_WEIGHTS: dict[str, dict[str, float]] = {
    "llama": {"cc": 0.67, "c4": 0.15, "github": 0.045, "wikipedia": 0.045, "book": 0.045, "arxiv": 0.025,
              "stack": 0.02},
    "sheared_llama": {"cc": 0.361, "c4": 0.492, "github": 0.008, "wikipedia": 0.031, "book": 0.091, "arxiv": 0.007,
                      "stack": 0.01},
}


class Mixture(Frozen):
    """The domain mixture: starting weights, and optionally Sheared-LLaMA's dynamic update."""
    preset: Literal["uniform", "llama", "sheared_llama", "custom"] = Field(
        "uniform", description="starting domain weights (custom: give --mixture-weights)")
    weights: dict[str, float] | None = Field(None, description="per-domain weights for preset custom, "
                                             "e.g. code=0.3,docs=0.7")
    # Sheared-LLaMA's update at every eval: w ← softmax(log w + η·(L_cur − L_ref)), then smoothing
    dynamic: bool = Field(False, description="update the domain weights from held-out losses (Sheared-LLaMA)")
    eta: float = Field(1.0, gt=0, description="dynamic update step size η")
    smoothing: float = Field(1e-4, ge=0, lt=1, description="c in w ← (1 − c)·w + c/K after each update")
    eval_every: int = Field(10, ge=1, description="optimizer steps between held-out evaluations (and updates)")
    eval_tokens_per_domain: int = Field(1024, ge=16, description="held-out tokens per domain per evaluation")

    @model_validator(mode="after")
    def _custom(self) -> "Mixture":
        if (self.preset == "custom") != (self.weights is not None):
            raise ValueError("mixture weights are given exactly when preset is custom")
        return self


class Gating(Frozen):
    """How the gate behaves while training: noise, load balancing, z-loss, or DIVE's soft routing."""
    noise: float = Field(0.0, ge=0, description="noisy top-k: logits + noise·ε·softplus(W_noise x)")
    balance: Literal["none", "cv", "switch"] = Field(
        "none", description="balance loss: LLaMA-MoE's cv²(importance)+cv²(load), or Switch/Mixtral's")
    balance_coef: float = Field(0.01, ge=0, description="balance loss weight")
    z_loss_coef: float = Field(0.0, ge=0, description="router z-loss weight: mean(logsumexp(logits)²)")
    bias_update_rate: float = Field(0.0, ge=0, description="DeepSeek-V3 aux-loss-free balancing: step of a "
                                    "selection-only bias per expert")
    soft_temperature: float | None = Field(None, gt=0, description="DIVE stage 0: every expert active, weights "
                                           "softmax(logits / T)")


class Lora(Frozen):
    """LoRA on the expert projections (peft), used by the `experts-lora` set and merged into the weights at the end
    of its stage."""
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")


class Distill(Frozen):
    """Learn from the dense source model as the teacher: KL(teacher ‖ student) on next-token distributions at a
    temperature (scaled by T², Hinton et al.), plus optional LM loss and hidden-state matching. The teacher runs
    without grad, per batch; its logits are never stored beyond the batch."""
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student")
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(teacher ‖ student)")
    lm_weight: float = Field(0.0, ge=0, description="weight of the LM loss beside it")
    hidden_weight: float = Field(0.0, ge=0, description="weight of every layer's hidden-state MSE, normalised by "
                                 "the teacher's energy")


class Stage(Frozen):
    """One training stage. On the command line these flags set every stage of the recipe, or, without --recipe,
    the one stage trained."""
    name: str = Field("stage", description="stage name (checkpoints and logs)",
                      json_schema_extra={"flag": "--stage-name"})
    trainable: Trainable = Field("router", description="what trains")
    tokens: int = Field(..., ge=1, description="token budget of the stage")
    seq_len: int = Field(256, ge=8, description="training sequence length")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    # for fitted routers (carve), whose weights are far smaller than any lr that suits the rest (loop.param_groups)
    router_lr_ratio: float | None = Field(None, gt=0, description="routers step by this fraction of their own "
                                          "weights' RMS instead of at --lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, as a fraction of --lr (LLaMA-MoE: 0.1)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (2-D weights only)")
    clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    gating: Gating = Gating()
    mixture: Mixture = Mixture()
    lora: Lora = Lora()
    distill: Distill | None = Field(None, description="learn from the dense source model (off: LM loss only)")

    @model_validator(mode="after")
    def _one_step(self) -> "Stage":
        if self.tokens < self.tokens_per_step:
            raise ValueError(f"token budget {self.tokens} is smaller than one optimizer step "
                             f"(seq_len × batch_size × grad_accum = {self.tokens_per_step})")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step


class TrainRecipe(Frozen):
    stages: list[Stage] = Field(..., min_length=1)
    seed: int = Field(0, ge=0, description="seed for data order, noise and LoRA init")  # numpy: non-negative only
    checkpoint_every: int = Field(10, ge=1, description="optimizer steps between checkpoints")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    # CPU bf16 autocast is slower than fp32 here, so auto means bf16 only on a GPU that supports it
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="autocast (auto: bf16 on a GPU "
                                                           "that supports it, fp32 elsewhere)")
    gradient_checkpointing: bool = Field(False, description="recompute layer activations in backward: less "
                                         "memory, ~1/3 more compute")
    # Training runs in fp32 whatever the MoE's dtype; writing that out would double a bf16 7B MoE to 27 GB.
    dtype: DTypeName = Field("source", description="dtype of the trained model in RUN/final (source: the MoE's "
                             "own)")
    # float32 weights a stage does not train double a bf16 MoE's memory (27 GB at 7B); kept bf16 and upcast as each
    # layer runs (train/frozen.py) they give the same numbers.
    frozen_dtype: Literal["float32", "source"] = Field("float32", description="dtype the weights a stage does not "
                                                       "train are kept in (source: the MoE's own, upcast as each "
                                                       "layer runs: the same numbers, and a bf16 MoE's weights in "
                                                       "half the memory; on the CPU the dense teacher and reference "
                                                       "too; needs gradient_checkpointing)")
    # A data-filter stage before training (fluency / advertisements); the kept corpus is written to RUN/filtered.
    filter: FilterRecipe | None = None
    # Layer-wise reconstruction of the MoE on the (filtered) training data before the first stage, written to
    # RUN/reconstructed: the MoE's own plan fitted to its dense source, as `build --reconstruct` would (enabled: true).
    reconstruct: ReconstructOptions = ReconstructOptions()

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data):
        """`preset: NAME` (or `--recipe NAME`) expands to that preset's stages; its other keys are the preset's."""
        if isinstance(data, dict) and "preset" in data:
            return expand_preset(data)
        return data

    @model_validator(mode="after")
    def _frozen_in_source_dtype(self) -> "TrainRecipe":
        if self.frozen_dtype == "source" and not self.gradient_checkpointing:
            # without recomputation backward keeps every layer's float32 upcast: memory goes up, not down
            raise ValueError("frozen_dtype: source needs gradient_checkpointing: true")
        return self


def load_train_recipe(recipe: Path | str | None, overrides: dict[str, Any] | None = None) -> TrainRecipe:
    """A training recipe from a YAML file or a built-in preset by name (e.g. `dive`), with command-line overrides
    on top (recipe_flags.recipe_overrides). overrides["stage"] sets those fields of every stage; without a recipe
    it is the one stage trained."""
    overrides = dict(overrides or {})
    stage = overrides.pop("stage", {})
    if recipe is None:
        if "tokens" not in stage:
            raise MoefyError(f"train needs --recipe (a YAML file or a preset: {', '.join(PRESETS)}), or --tokens "
                             "and the other stage flags for a one-stage run")
        data: dict[str, Any] = {"stages": [{}]}
    elif str(recipe) in PRESETS and not Path(recipe).exists():
        data = {"preset": str(recipe)}
    elif not Path(recipe).is_file():
        raise MoefyError(f"recipe file not found: {recipe} (built-in presets: {', '.join(PRESETS)})")
    else:
        data = read_recipe(Path(recipe))
    if "preset" in data:  # expanded here, so the stage flags reach the preset's stages
        try:
            data = expand_preset(data)
        except ValueError as exc:
            raise MoefyError(f"invalid recipe: {exc}") from exc
    data = deep_merge(data, overrides)
    stages = data.get("stages")
    if stage and isinstance(stages, list) and all(isinstance(s, dict) for s in stages):
        data["stages"] = [deep_merge(s, stage) for s in stages]
    return validate_recipe(TrainRecipe, data)
