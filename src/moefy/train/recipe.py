"""The training recipe: one or more stages, each saying what trains, how the gate behaves, the data mixture, the
optimiser and schedule, and the token budget. Frozen pydantic; unknown keys are errors."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moefy.construct.recipe import ReconstructOptions
from moefy.data.filtering import FilterRecipe
from moefy.recipes import Frozen

Trainable = Literal["norm", "router", "router+norm", "experts-lora", "experts", "all"]

# Static domain-weight presets (DESIGN §5). They name RedPajama's domains, so they apply to corpora that use them.
DOMAIN_WEIGHTS: dict[str, dict[str, float]] = {
    "llama": {"cc": 0.67, "c4": 0.15, "github": 0.045, "wikipedia": 0.045, "book": 0.045, "arxiv": 0.025,
              "stack": 0.02},
    "sheared_llama": {"cc": 0.361, "c4": 0.492, "github": 0.008, "wikipedia": 0.031, "book": 0.091, "arxiv": 0.007,
                      "stack": 0.01},
}


class Mixture(Frozen):
    # uniform | llama | sheared_llama | custom (with weights) — the starting weights
    preset: Literal["uniform", "llama", "sheared_llama", "custom"] = "uniform"
    weights: dict[str, float] | None = None  # for preset=custom
    # dynamic: Sheared-LLaMA's update at every eval, w ← softmax(log w + η·(L_cur − L_ref)), then smoothing
    dynamic: bool = False
    eta: float = Field(1.0, gt=0)
    smoothing: float = Field(1e-4, ge=0, lt=1)  # c in w ← (1 − c)·w + c/K
    eval_every: int = Field(10, ge=1)  # optimizer steps between evaluations (and weight updates)
    eval_tokens_per_domain: int = Field(1024, ge=16)

    @model_validator(mode="after")
    def _custom(self) -> "Mixture":
        if (self.preset == "custom") != (self.weights is not None):
            raise ValueError("mixture weights are given exactly when preset is custom")
        return self


class Gating(Frozen):
    noise: float = Field(0.0, ge=0)  # noisy top-k: logits + noise·ε·softplus(W_noise x), ε ~ N(0, 1)
    balance: Literal["none", "cv", "switch"] = "none"  # LLaMA-MoE cv²(importance)+cv²(load), or Switch/Mixtral aux
    balance_coef: float = Field(0.01, ge=0)
    z_loss_coef: float = Field(0.0, ge=0)  # router z-loss: mean(logsumexp(logits)²)
    bias_update_rate: float = Field(0.0, ge=0)  # DeepSeek-V3 aux-loss-free balancing: a selection-only bias
    soft_temperature: float | None = Field(None, gt=0)  # DIVE stage 0: every expert, weights softmax(logits / T)


class Lora(Frozen):
    """LoRA on the expert projections (peft), used by the `experts-lora` set and merged into the weights at the end
    of its stage."""
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class Distill(Frozen):
    """Learn from the dense source model as the teacher: KL(teacher ‖ student) on next-token distributions at a
    temperature (scaled by T², Hinton et al.), plus optional LM loss and hidden-state matching. The teacher runs
    without grad, per batch; its logits are never stored beyond the batch."""
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, ge=0)
    lm_weight: float = Field(0.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)  # MSE of every layer's hidden state, normalised by the teacher's energy


class Stage(Frozen):
    name: str = "stage"
    trainable: Trainable = "router"
    tokens: int = Field(..., ge=1)  # token budget of this stage
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    # routers step by this fraction of their own weights' RMS instead of at `lr` (see loop.param_groups); for
    # fitted routers (carve), whose weights are far smaller than any lr that suits the rest
    router_lr_ratio: float | None = Field(None, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine floor (LLaMA-MoE used 0.1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(1.0, gt=0)
    gating: Gating = Gating()
    mixture: Mixture = Mixture()
    lora: Lora = Lora()
    distill: Distill | None = None  # None: LM loss only

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
    seed: int = Field(0, ge=0)  # numpy's generators take non-negative seeds only
    checkpoint_every: int = Field(10, ge=1)  # optimizer steps
    keep_last: int = Field(2, ge=1)
    # auto: bf16 autocast on a GPU that supports it, fp32 elsewhere (CPU bf16 autocast is slower than fp32 here)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory, ~1/3 more compute
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
            from moefy.train.presets import expand_preset

            return expand_preset(data)
        return data
