"""The build recipe (moefy build) and its sections: how experts are cut, how routers start, DIVE's mining and the
layer-wise reconstruction. Read from YAML and command-line flags (recipe_flags.py) through recipes.load_recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from moefy.profile.options import ProfileOptions
from moefy.recipes import Frozen, MemorySize
from moefy.tensor_writer import SHARD_BYTES

DTypeName = Literal["source", "float32", "bfloat16", "float16"]


class ClusterOptions(Frozen):
    # not "on": YAML reads that as true
    rows: Literal["up", "gate"] = Field("up", description="cluster method: which projection's rows are clustered")
    iterations: int = Field(20, ge=1, description="cluster method: Lloyd iterations before the balanced rounds")
    balanced_rounds: int = Field(3, ge=1, description="cluster method: exact balanced re-assignments "
                                                      "(~10 ms each per layer at 1536 neurons)")
    # 5: the share of activation mass the routed experts cover stops growing after about 5 rounds on SmolLM2, and
    # make demo's split after reconstruction went from x1.65-1.73 held-out over three seeds to x1.64-1.66
    # (docs/results.md, reconstruction-refine).
    refine_rounds: int = Field(5, ge=0, description="carve: rounds that re-assign neurons to the experts whose "
                               "tokens a linear router picks (0: the clustered partition as it is)")
    # |a| alone leaves out how far a neuron moves the layer's output: its contribution is a·W_down[:, j]. output:
    # x8.72 -> x7.53 training-free at 25%; after reconstruction, unseen x5.08-5.14 -> x4.90-4.98 over three seeds,
    # held-out x1.64-1.66 -> x1.63-1.66, and x1.22 unchanged at 50% (docs/results.md, "carve's neurons sized by
    # their output").
    measure: Literal["activation", "output"] = Field("output", description="carve: a neuron's size on a token "
                                                     "when clustering and refining: |a| (activation), or |a| times "
                                                     "the norm of its down-projection column (output)")


class RouterInit(Frozen):
    # random/zero need no data; the rest need --calib: centroid (mean hidden state of the tokens that activate an
    # expert's neurons most), hidden-kmeans (balanced k-means of MLP inputs), domain (mean hidden state per domain),
    # representative (the gate row of each expert's most typical neuron, CMoE), fit (see construct/router_fit.py).
    # None is filled in with the method's default before the recipe is saved.
    kind: Literal["random", "zero", "centroid", "hidden-kmeans", "domain", "representative", "fit"] | None = Field(
        None, description="router init (default: fit for carve, random otherwise)",
        json_schema_extra={"flag": "--router-init"})
    std: float = Field(0.02, ge=0.0, description="std of the random router init")
    ridge: float = Field(1e-2, ge=0.0, description="fitted router's ridge penalty, relative to the mean feature "
                                                   "variance")


class DiveOptions(Frozen):
    """DIVE (DESIGN §4): per-domain pruning, affinity mining, one expert per domain group."""
    score: Literal["flap", "wanda", "taylor"] = Field("flap", description="dive: structured neuron score",
                                                      json_schema_extra={"flag": "--prune-score"})
    affinity: Literal["both", "iou", "loss"] = Field("both", description="dive: domain affinity from mask IoU, "
                                                                         "cross-domain loss, or their mean")
    discover_domains: int | None = Field(None, ge=2, description="dive: cluster the documents into M pseudo-domains "
                                                                 "(automatic when unlabelled)",
                                         json_schema_extra={"flag": "--discover-domains", "metavar": "M"})
    affinity_fraction: float = Field(0.2, gt=0, lt=1, description="dive: share of each domain's documents held out "
                                                                  "for the cross-domain loss")
    # 512: half the time of 1024 for the cross-domain losses; on the bench corpus (docs/benchmarks.md, DIVE against
    # carve) the affinities moved by at most 0.066 and the groups stayed the same.
    affinity_tokens_per_domain: int = Field(512, ge=16, description="dive: held-out tokens per domain for the "
                                            "cross-domain loss")
    embed_tokens: int = Field(256, ge=8, description="dive: tokens of each document mean-pooled for its embedding")


class ReconstructOptions(Frozen):
    """Layer-wise reconstruction after construction (construct/reconstruct.py): fit each MoE layer's experts to
    the dense model on inputs from the already-converted layers. Closed form, then Adam steps; no LM loss."""
    # Defaults are the best setting measured on SmolLM2 at 25% active (docs/results.md, bench_reconstruct.py).
    enabled: bool = Field(False, description="refit the experts to the dense model, layer by layer, on the "
                          "calibration corpus (build: --calib; train: --data)",
                          json_schema_extra={"flag": "--reconstruct"})
    # "stream" also corrects the drift of everything before, attention included.
    target: Literal["ffn", "stream"] = Field("stream", description="what each layer is fitted to: the dense "
                                             "residual stream, or the dense FFN's output on the same inputs")
    rounds: int = Field(1, ge=1, description="alternations of router fit and closed-form expert fit")
    # Off by default: in an exploratory run at 25% (target ffn), carve's routers, fitted on dense inputs,
    # generalised better to held-out text than the refitted ones.
    router: bool = Field(False, description="also refit the routers on the converted model's inputs")
    ridge: float = Field(1e-3, ge=0.0, description="down projections' ridge penalty, relative to the mean feature "
                                                   "energy")
    router_ridge: float = Field(1e-2, ge=0.0, description="refitted routers' ridge penalty")
    seq_len: int = Field(256, ge=8, description="reconstruction sequence length")
    tokens_per_domain: int | None = Field(8192, ge=1, description="reconstruction calibration tokens per domain")
    batch_size: int = Field(8, ge=1, description="sequences per forward")
    # 0: closed form only, about a third of the time (SmolLM2 25%: ×1.98 closed form, ×1.65 with 300 steps).
    steps: int = Field(300, ge=0, description="Adam steps on every expert weight (and the router, with "
                       "train_router) per layer after the closed form")
    lr_ratio: float = Field(1e-2, gt=0, description="each tensor's Adam lr, as a fraction of its own RMS")
    # TF32 is opt-in: on a GPU it halves the steps' time at the 7B layer shape, but on SmolLM2 (TF32 emulated on the
    # CPU) the layers' mean error after reconstruction was 1% higher, 0.2311 against 0.2289 (docs/benchmarks.md,
    # step precision). The closed form never uses TF32.
    step_matmul: Literal["fp32", "tf32"] = Field("fp32", description="matmul precision of the Adam steps on "
                                                 "CUDA GPUs (the CPU computes fp32 either way)")
    step_tokens: int = Field(512, ge=1, description="random calibration tokens per Adam step")
    # SmolLM2, make demo's 28 × 48 top-4 split: ×1.72 → ×1.66 dense held-out, unseen ×4.86 → ×4.61, same time;
    # neutral at 50% active (docs/results.md, reconstruction-self).
    # The stock gate's gradient reaches only the chosen experts' logits; a straight-through gradient to the runners-up
    # measured neutral at 25% and 50% and for DIVE's top-1 (docs/results.md, routing oracle), so it is not offered.
    train_router: bool = Field(True, description="the Adam steps train the routers too, re-routing each batch (no "
                               "effect at top-1: the stock gate's one weight is a constant 1)")
    delta_rank: int | None = Field(None, ge=1, description="the Adam steps train a rank-r delta of each layer's "
                                   "stacked expert weights instead of every weight (None: every weight)")


# The construction methods (construct/registry.py's METHODS holds their code; a test keeps the two lists equal).
METHOD_NAMES = ("random", "sequential", "cluster", "coactivation", "carve", "importance", "upcycle", "dive")


class BuildRecipe(Frozen):
    model: str = Field(description="local HF dir, .gguf file, hub id, or alias (smollm2-135m)")
    experts: int = Field(8, description="number of experts N")
    top_k: int = Field(2, description="experts active per token k")
    # checked against METHOD_NAMES when the recipe is read, before any model is touched
    method: str = Field("random", description=f"construction method: {', '.join(METHOD_NAMES)}")
    seed: int = Field(0, ge=0, description="seed for every random choice")  # numpy takes non-negative seeds only
    scale: float | None = Field(None, description="expert output scale folded into down_proj (default N/k, "
                                                  "LLaMA-MoE's convention)")
    dtype: DTypeName = Field("source", description="output dtype")
    # The weights written are the same up to float rounding, wherever they were fitted.
    device: str = Field("auto", description="where profiling and reconstruction compute: auto (a GPU when present),"
                                            " cpu, cuda, cuda:N")
    # Spilling changes where the activations wait, not the numbers (profile/activations.py).
    max_memory: MemorySize | None = Field(None, description="budget for the calibration activations cached between "
                                          "layers, e.g. 8GiB; above it they wait on disk (default: half the memory "
                                          "free on the compute device)", json_schema_extra={"metavar": "SIZE"})
    router: RouterInit = RouterInit()
    cluster: ClusterOptions = ClusterOptions()
    calib: str | None = Field(None, description="calibration corpus (.jsonl/.parquet/.txt or a directory), for the "
                                                "data-driven methods and router inits")
    profile: ProfileOptions = ProfileOptions()
    layers: str | list[int] = Field("all", description="MoE layers: all, every_other, last:N, or a comma list "
                                                       "(others stay dense)")
    shared_fraction: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of FFN neurons kept always-on"
                                          " as a shared expert, carve and importance inter (default 0.125 for carve)")
    importance: Literal["independent", "inner", "inter"] = Field("independent", description="importance variant")
    # Drop-upcycling: re-initialised neurons (seeded, per expert) let the copies diverge in training.
    drop_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="upcycle: fraction of neurons re-initialised in "
                                                                  "each full-FFN copy")
    max_shard_bytes: int = Field(SHARD_BYTES, ge=1024**2, description="largest output safetensors shard")
    # None resolves to 1/N, so k active experts are k/N of the FFN
    keep: float | None = Field(None, gt=0, le=1, description="dive: fraction of FFN neurons each expert keeps "
                                                             "(default 1/N)")
    dive: DiveOptions = DiveOptions()
    reconstruct: ReconstructOptions = ReconstructOptions()

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_list(cls, value):
        """A comma list of layer numbers may come as text ("0,2,5", from the command line or YAML)."""
        if isinstance(value, str) and value[:1].isdigit():
            try:
                return [int(i) for i in value.split(",")]
            except ValueError:
                raise ValueError(f"layers takes all, every_other, last:N or comma-separated layer numbers "
                                 f"(got {value!r})") from None
        return value

    @model_validator(mode="after")
    def _counts(self) -> "BuildRecipe":
        if self.method not in METHOD_NAMES:
            raise ValueError(f"unknown method {self.method!r}; available: {', '.join(METHOD_NAMES)}")
        if self.experts < 1:
            raise ValueError(f"experts must be at least 1 (got {self.experts})")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k must be between 1 and the number of experts {self.experts} (got {self.top_k})")
        if self.device != "auto":
            import torch  # only to parse the name; whether that device exists is checked when a pass runs

            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"scale must be positive (got {self.scale})")
        return self

    @property
    def resolved_scale(self) -> float:
        return self.scale if self.scale is not None else self.experts / self.top_k
