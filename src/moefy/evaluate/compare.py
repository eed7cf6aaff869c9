"""`moefy eval`: held-out perplexity per domain of several models on one corpus, side by side, with what a user
compares them by: speed against each MoE's dense source (or the first GGUF), lm-eval tasks, and each moefy build's
oracles (its partition with ideal routing, and the neuron oracle, computed inside its dense source; its own experts
with ideal routing)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moefy.construct.plan import PLAN_JSON, load_plan
from moefy.data.corpus import load_corpus
from moefy.errors import MoefyError, check_at_least
from moefy.evaluate.harness import run_tasks
from moefy.evaluate.options import EXPERTS_IMPLEMENTATIONS, NOT_COMPILABLE
from moefy.evaluate.speed import Speed, ratios
from moefy.evaluate.speed import measure as measure_speed
from moefy.export import llama_cpp
from moefy.export.oracle import active_fraction, expert_oracle, neuron_oracle, routing_oracle
from moefy.models import load_causal_lm, load_in_float32, load_tokenizer
from moefy.profile.perplexity import Perplexity, heldout_perplexity
from moefy.sources import resolve_model

LLAMA_CPP = "llama.cpp:"  # `moefy eval llama.cpp:FILE.gguf`: score that GGUF in llama.cpp, not transformers


@dataclass(frozen=True)
class EvalResult:
    perplexity: dict[str, Perplexity]  # model spec -> per-domain perplexity
    speed: dict[str, Speed]  # model spec (and its dense source) -> speed, when asked for
    tasks: dict[str, dict]  # model spec -> {task: {metric: value}}, when asked for
    corpus: dict  # the held-out corpus as read (documents, records skipped and why)
    # model spec -> the model its speed is divided by: an MoE's dense source (transformers), or the first GGUF listed
    # (llama.cpp: list the dense GGUF first)
    baseline: dict[str, str] = dataclasses.field(default_factory=dict)
    # moefy build spec -> its bounds on the same corpus, computed inside its dense source, when asked for (--oracle)
    oracles: dict[str, Oracles] = dataclasses.field(default_factory=dict)
    experts_implementation: str | None = None  # the transformers MoEs' experts kernel; None: transformers' default
    compiled: bool = False  # the transformers models' speed was timed compiled (torch.compile, static KV cache)

    def speed_ratio(self, spec: str) -> dict[str, float]:
        """{forward, prefill, generate}: tokens/s of `spec` ÷ its baseline's, measured in the same run."""
        return ratios(self.speed[spec], self.speed[self.baseline.get(spec, spec)])

    def to_dict(self) -> dict:
        return {"perplexity": {m: p.to_dict() for m, p in self.perplexity.items()},
                "speed": {m: {**s.to_dict(), "baseline": self.baseline.get(m, m),
                              **{f"{r}_x_baseline": x for r, x in self.speed_ratio(m).items()}}
                          for m, s in self.speed.items()},
                "tasks": self.tasks, "corpus": self.corpus, "experts_implementation": self.experts_implementation,
                "compiled": self.compiled,
                "oracles": {m: {"active_fraction": o.active_fraction, "expert": o.expert.to_dict(),
                                "neuron": o.neuron.to_dict(), "routing": o.routing.to_dict()}
                            for m, o in self.oracles.items()}}


@dataclass(frozen=True)
class Oracles:
    """Where a build's loss sits on a corpus (export/oracle.py): its expert oracle (its own partition, ideal
    routing, the dense weights) and the neuron oracle at its active fraction, both run inside its dense source; and
    its routing oracle (the build's own experts and router weights, ideal choice of experts)."""
    active_fraction: float
    expert: Perplexity
    neuron: Perplexity
    routing: Perplexity


def evaluate(models: list[str], data: str, seq_len: int = 256, stride: int | None = None,
             tokens_per_domain: int | None = 4096, speed: bool = False, tasks: list[str] | None = None,
             task_limit: int | None = None, oracle: bool = False,
             experts_implementation: str | None = None, compiled: bool = False) -> EvalResult:
    """Held-out perplexity per domain for each model (dense or MoE), optionally speed against the dense source, and
    (oracle) each moefy build's expert and neuron oracles on the same corpus. experts_implementation: run the
    transformers MoEs with that experts kernel (perplexity, tasks and speed alike) instead of transformers'
    default; llama.cpp rows and dense models are unaffected. compiled: time the transformers models' speed compiled
    with torch.compile's inductor (generation on a static KV cache), each compiled once before timing."""
    check_at_least(2, seq_len=seq_len)  # a window needs a token to predict from and one to score
    check_at_least(1, stride=stride, tokens_per_domain=tokens_per_domain, task_limit=task_limit)
    if experts_implementation not in (None, *EXPERTS_IMPLEMENTATIONS):
        raise MoefyError(f"experts implementation {experts_implementation!r} is not one of "
                         f"{', '.join(EXPERTS_IMPLEMENTATIONS)}")
    if compiled and not speed:
        raise MoefyError("--compile times the models compiled; it needs --speed")
    if compiled and experts_implementation in NOT_COMPILABLE:
        raise MoefyError(f"--compile cannot time the {experts_implementation} experts kernel: torch.compile breaks its "
                         "graph at every expert; compile with grouped_mm or batched_mm")

    corpus = load_corpus(data)
    if tasks and any(spec.startswith(LLAMA_CPP) for spec in models):
        raise MoefyError("lm-eval tasks run on transformers models only; drop the llama.cpp: models or --tasks")
    dirs, builds = {}, {}  # spec -> directory of each transformers model, and of each moefy build (--oracle)
    if oracle:
        dirs = {spec: resolve_model(spec).directory for spec in models if not spec.startswith(LLAMA_CPP)}
        builds = {spec: d for spec, d in dirs.items() if (d / PLAN_JSON).is_file()}
    if oracle and not builds:  # before any model loads
        raise MoefyError("--oracle needs a moefy build among the models (a directory with moefy_plan.json): the "
                         "oracles run its plan inside its dense source")
    for spec in models:  # every spec resolves before the first model loads: a typo in the last fails in seconds
        if not spec.startswith(LLAMA_CPP):
            resolve_model(spec)
    # Perplexity and tasks need one model at a time, so each is freed before the next loads (a 7B pair in float32
    # is 54 GB); timing and the oracles use them together, and only then are they kept.
    loaded, results, task_scores = {}, {}, {}
    for spec in models:
        model, tok = _load_for_eval(spec, seq_len, experts_implementation, timed=speed)
        results[spec] = heldout_perplexity(model, tok, corpus, seq_len, tokens_per_domain, stride)
        if tasks:
            task_scores[spec] = run_tasks(model, tok, tasks, limit=task_limit)
        if speed or oracle:
            loaded[spec] = (model, tok)
        del model, tok
    speeds: dict[str, Speed] = {}
    baseline: dict[str, str] = {}
    if speed:
        timed = {spec: model for spec, (model, _) in loaded.items()}
        ggufs = [spec for spec in models if spec.startswith(LLAMA_CPP)]
        for spec in models:  # each MoE is timed against the dense model it was built from, in the same run
            if spec.startswith(LLAMA_CPP):
                baseline[spec] = ggufs[0]  # a GGUF names no source
                continue
            plan_json = resolve_model(spec).directory / PLAN_JSON
            if plan_json.is_file():
                source = json.loads(plan_json.read_text())["source"]
                timed.setdefault(source, load_causal_lm(resolve_model(source).directory))
                baseline[spec] = source
        probe = torch.randint(0, next(iter(timed.values())).config.vocab_size, (4, seq_len),
                              generator=torch.Generator().manual_seed(0))
        speeds = measure_speed(timed, probe, compile_backend="inductor" if compiled else None)
    # the models already loaded serve the oracles too (each oracle's hooks come off when it is done)
    in_memory = {d.resolve(): loaded[spec][0] for spec, d in dirs.items()}
    oracles = {spec: _oracles(d, loaded[spec][0], in_memory, corpus, seq_len, tokens_per_domain, stride)
               for spec, d in builds.items()}
    return EvalResult(results, speeds, task_scores, corpus.summary(), baseline, oracles, experts_implementation,
                      compiled)


def _oracles(build: Path, moe, loaded: dict[Path, object], corpus, seq_len: int, tokens_per_domain: int | None,
             stride: int | None) -> Oracles:
    """A build's three oracles. `loaded` maps the directories of the models in memory to them; its dense source is
    loaded (and added there, for the next build from it) only when it is not among them."""
    plan = load_plan(build)
    source = resolve_model(plan.meta.source).directory
    key = source.resolve()
    if key not in loaded:
        loaded[key] = load_in_float32(source)
    dense, tok = loaded[key], load_tokenizer(source)
    fraction = active_fraction(plan)
    with expert_oracle(dense, plan):
        expert = heldout_perplexity(dense, tok, corpus, seq_len, tokens_per_domain, stride)
    with neuron_oracle(dense, fraction):
        neuron = heldout_perplexity(dense, tok, corpus, seq_len, tokens_per_domain, stride)
    with routing_oracle(moe, dense):
        routing = heldout_perplexity(moe, tok, corpus, seq_len, tokens_per_domain, stride)
    return Oracles(fraction, expert, neuron, routing)


def _load_for_eval(spec: str, seq_len: int, experts_implementation: str | None, timed: bool):
    """(model, tokenizer): transformers for a model spec, llama.cpp (with its own tokenizer) for llama.cpp:FILE.
    A transformers model computes in float32 (models.load_in_float32: kept as stored and read as float32 where
    memory is short, the same losses); a timed one is a float32 model, as a user runs it."""
    if spec.startswith(LLAMA_CPP):
        lm = llama_cpp.LlamaCppLM(Path(spec.removeprefix(LLAMA_CPP)), n_ctx=seq_len + 64)
        return lm, lm.tokenizer
    directory = resolve_model(spec).directory
    model = load_causal_lm(directory) if timed else load_in_float32(directory)
    if experts_implementation:  # a dense model takes it as a no-op
        model.set_experts_implementation(experts_implementation)
    return model, load_tokenizer(directory)
