"""Frozen, validated recipes. YAML in, the resolved recipe out next to every result."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moefy.errors import MoefyError

DTypeName = Literal["source", "float32", "bfloat16", "float16"]
# The resolved recipe saved next to every output: a build's, and a training run's (in the run and its final model).
BUILD_RECIPE = "moefy.yaml"
TRAIN_RECIPE = "moefy_train.yaml"


class Frozen(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number in any recipe field (--scale nan) is refused, not written out.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ClusterOptions(Frozen):
    rows: Literal["up", "gate"] = "up"  # which projection's rows are clustered (not "on": YAML reads that as true)
    iterations: int = Field(20, ge=1)  # Lloyd iterations before the balanced assignment rounds
    balanced_rounds: int = Field(3, ge=1)  # exact balanced re-assignments (~10 ms each per layer at I=1536)


class RouterInit(Frozen):
    # random/zero need no data; the rest need --calib: centroid (mean hidden state of the tokens that activate an
    # expert's neurons most), hidden-kmeans (balanced k-means of MLP inputs), domain (mean hidden state per domain),
    # representative (the gate row of each expert's most typical neuron, CMoE), fit (see construct/router_fit.py).
    # None: the method's default (fit for carve, random otherwise), filled in before the recipe is saved.
    kind: Literal["random", "zero", "centroid", "hidden-kmeans", "domain", "representative", "fit"] | None = None
    std: float = Field(0.02, ge=0.0)  # for kind=random
    ridge: float = Field(1e-2, ge=0.0)  # for kind=fit: ridge penalty, relative to the mean feature variance


class ProfileOptions(Frozen):
    seq_len: int = Field(256, ge=8)
    tokens_per_domain: int | None = Field(4096, ge=1)  # None: every token of the calibration corpus
    top_fraction: float = Field(0.25, gt=0, le=1)  # a neuron is "top-activated" if in its token's top fraction by |a|
    sample_tokens: int = Field(2048, ge=16)  # tokens whose hidden states and |a| are kept for clustering/router fits
    taylor: bool = False  # also |a·∂L/∂a| (needs a backward pass over the full model)
    batch_size: int = Field(8, ge=1)


class DiveOptions(Frozen):
    """DIVE (DESIGN §4): per-domain pruning, affinity mining, one expert per domain group."""
    score: Literal["flap", "wanda", "taylor"] = "flap"  # structured neuron score from the profiler's moments
    affinity: Literal["both", "iou", "loss"] = "both"  # mask IoU, cross-domain loss, or their mean
    discover_domains: int | None = Field(None, ge=2)  # cluster documents into M pseudo-domains (also when unlabelled)
    affinity_fraction: float = Field(0.2, gt=0, lt=1)  # share of each domain's documents held out for the loss
    affinity_tokens_per_domain: int = Field(1024, ge=16)
    embed_tokens: int = Field(256, ge=8)  # tokens of each document mean-pooled for its embedding


class ReconstructOptions(Frozen):
    """Layer-wise reconstruction after construction (construct/reconstruct.py): fit each MoE layer's router and
    down projections to the dense FFN on inputs from the already-converted layers. Closed form; no LM loss."""
    # Defaults are the best setting measured on SmolLM2 at 25% active (docs/results.md, bench_reconstruct.py).
    enabled: bool = False
    # "stream": make the layer's output bring the residual stream back to the dense model's own (corrects the drift
    # of everything before, attention included); "ffn": match the dense FFN's output on the same inputs.
    target: Literal["ffn", "stream"] = "stream"
    rounds: int = Field(1, ge=1)  # alternations of router fit and closed-form expert fit
    # Refit the router on the converted model's inputs. Off by default: in an exploratory run at 25% (target ffn),
    # carve's routers, fitted on dense inputs, generalised better to held-out text than the refitted ones.
    router: bool = False
    ridge: float = Field(1e-3, ge=0.0)  # down projections' ridge penalty, relative to the mean feature energy
    router_ridge: float = Field(1e-2, ge=0.0)
    seq_len: int = Field(256, ge=8)
    tokens_per_domain: int | None = Field(8192, ge=1)  # calibration tokens per domain (None: all)
    batch_size: int = Field(8, ge=1)
    # After the closed form: Adam steps on every expert weight (gate, up, down; routed and shared) per layer, each
    # tensor at lr_ratio × its own RMS, on step_tokens random calibration tokens a step. 0: closed form only, about
    # a third of the time (SmolLM2 25%: ×1.98 closed form, ×1.65 with 300 steps; docs/results.md).
    steps: int = Field(300, ge=0)
    lr_ratio: float = Field(1e-2, gt=0)
    step_tokens: int = Field(512, ge=1)


# The construction methods (construct/registry.py's METHODS holds their code; a test keeps the two lists equal).
METHOD_NAMES = ("random", "sequential", "cluster", "coactivation", "carve", "importance", "upcycle", "dive")


class BuildRecipe(Frozen):
    model: str
    experts: int = 8
    top_k: int = 2
    method: str = "random"  # one of METHOD_NAMES, checked when the recipe is read (before any model is touched)
    seed: int = Field(0, ge=0)  # numpy's generators take non-negative seeds only
    # Output scale folded into down_proj; None means N/k (LLaMA-MoE's convention).
    scale: float | None = None
    dtype: DTypeName = "source"
    # Where the calibration passes (profiling, reconstruction) compute, one decoder layer at a time: auto (a GPU
    # when torch sees one), cpu, cuda or cuda:N. The weights written are the same up to float rounding.
    device: str = "auto"
    router: RouterInit = RouterInit()
    cluster: ClusterOptions = ClusterOptions()
    calib: str | None = None  # calibration corpus, for the data-driven methods and router inits
    profile: ProfileOptions = ProfileOptions()
    layers: str | list[int] = "all"  # all, every_other, last:N, or a list; other layers stay dense
    # Always-on shared neurons (carve, importance-inter); None: the method's default (0.125 for carve, else 0).
    shared_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    importance: Literal["independent", "inner", "inter"] = "independent"
    # Drop-upcycling: in each full-FFN copy, re-initialise this fraction of neurons (seeded, per expert), so that
    # copies can diverge in training. Only for method upcycle.
    drop_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_shard_bytes: int = Field(2 * 1024**3, ge=1024**2)
    # dive: fraction of FFN neurons each expert keeps; None resolves to 1/N, so k active experts are k/N of the FFN
    keep: float | None = Field(None, gt=0, le=1)
    dive: DiveOptions = DiveOptions()
    reconstruct: ReconstructOptions = ReconstructOptions()

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


def load_recipe(model_cls: type[Frozen], path: Path | None, overrides: dict[str, Any]) -> Any:
    """Read a YAML recipe (if given), apply CLI overrides (None means 'not given'), validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MoefyError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise MoefyError(f"recipe {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
        except yaml.YAMLError as exc:
            raise MoefyError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(data, dict):
            raise MoefyError(f"recipe {path} must be a mapping of fields")
    return validate_recipe(model_cls, deep_merge(data, overrides))


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` on top of `base`, section by section: a flag for one nested field (--router-std) keeps the
    recipe's other fields of that section (router.kind). None means 'not given'."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, dict):
            merged[key] = {k: v for k, v in value.items() if v is not None}
        else:
            merged[key] = value
    return merged


def validate_recipe(model_cls: type[Frozen], data: dict[str, Any]) -> Any:
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise MoefyError(f"invalid recipe: {where + ': ' if where else ''}{msg}") from exc


def dump_recipe(recipe: Frozen, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
