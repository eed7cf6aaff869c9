"""The Python API. Each CLI verb is a thin call into one function here."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moefy.atomic import atomic_output, check_output
from moefy.construct.dive_mining import MINING_DIR, mine, settle_domains
from moefy.construct.placement import moe_layers
from moefy.construct.plan import MoEPlan
from moefy.construct.registry import make_plan, resolve_defaults
from moefy.data.corpus import load_corpus
from moefy.data.tokens import token_blocks
from moefy.errors import MoefyError
from moefy.evaluate.harness import run_tasks
from moefy.evaluate.perplexity import Perplexity, heldout_perplexity
from moefy.evaluate.speed import Speed
from moefy.evaluate.speed import measure as measure_speed
from moefy.export.card import write_card
from moefy.export.checkpoint import write_checkpoint
from moefy.export.formats import choose_format
from moefy.export.verify import VerifyReport, load_causal_lm, verify
from moefy.families import family_for
from moefy.profile.runner import profile_cached
from moefy.progress import progress
from moefy.recipes import BuildRecipe, dump_recipe, load_recipe, validate_recipe
from moefy.sources import SIDE_FILES, resolve_model
from moefy.tensor_io import LazyCheckpoint

RECIPE_NAME = "moefy.yaml"

__all__ = ["BuildResult", "build", "verify", "VerifyReport", "EvalResult", "evaluate", "analyze", "train",
           "filter_corpus"]
RUN_JSON = "run.json"


@dataclass(frozen=True)
class BuildResult:
    out: Path
    plan: MoEPlan
    architecture: str
    total_params: int
    active_params: int
    dense_params: int


def build(recipe: BuildRecipe, out: Path, overwrite: bool = False) -> BuildResult:
    """Split a dense checkpoint's FFNs into experts and write a standard HF MoE checkpoint to `out`."""
    out = Path(out)
    check_output(out, overwrite)  # fail before any expensive work
    recipe = resolve_defaults(recipe)
    source = resolve_model(recipe.model)
    config = source.config()
    family = family_for(config)
    reader = LazyCheckpoint(source.directory)
    family.check(config, reader.names())
    missing = [k for k in (family.ffn_key(0, w) for w in ("gate", "up", "down")) if k not in reader]
    if missing:
        raise MoefyError(f"{source.directory} does not hold the {family.model_type} FFN weights (missing {missing[0]})")
    stats, mining, extra = None, None, None
    if recipe.method == "dive" and recipe.calib is None:
        raise MoefyError("dive prunes on calibration domains: pass --calib CORPUS")
    if recipe.calib is not None:
        options = recipe.profile
        if (recipe.method == "importance" or recipe.dive.score == "taylor") and not options.taylor:
            options = options.model_copy(update={"taylor": True})  # these scores are defined by the Taylor term
        corpus = load_corpus(recipe.calib)  # read now, so a bad corpus fails before any work
        domains = None
        if recipe.method == "dive":  # labelled, discovered or split domains; some documents held out for affinity
            domains = settle_domains(recipe, source, corpus)
            corpus = domains.prune
        # Profiled on first use only: methods and router inits that never read stats skip the calibration pass.
        stats = functools.cache(lambda: profile_cached(source, family, corpus, options, recipe.seed))
        if domains is not None:
            layers = moe_layers(recipe.layers, int(config["num_hidden_layers"]))
            mining = mine(recipe, source, family, reader, stats(), domains, layers)
            extra = {"groups": mining.groups, "group_names": mining.group_names()}
    plan = make_plan(recipe, family, config, reader, stats, extra)
    fmt = choose_format(family.formats, plan.meta, config)
    dense_params = sum(_numel(reader.shape(n)) for n in reader.names())
    with atomic_output(out, overwrite) as tmp:
        total = write_checkpoint(reader, family, config, plan, fmt, tmp, recipe.dtype, recipe.max_shard_bytes)
        dtype = recipe.dtype if recipe.dtype != "source" else str(reader.dtype(family.ffn_key(0, "down"))).removeprefix("torch.")
        model_config = fmt.config(config, plan.meta, dtype)
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
        for name in SIDE_FILES:
            if (source.directory / name).is_file():
                shutil.copy2(source.directory / name, tmp / name)
        plan.save(tmp)
        if mining is not None:
            mining.save(tmp / MINING_DIR, plan)
        dump_recipe(recipe, tmp / RECIPE_NAME)
        architecture = model_config["architectures"][0]
        write_card(tmp, plan.meta, source.description, architecture, total, dense_params)
    return BuildResult(out, plan, architecture, total, plan.meta.active_params(total), dense_params)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class EvalResult:
    perplexity: dict[str, Perplexity]  # model spec -> per-domain perplexity
    speed: dict[str, Speed]  # model spec (and its dense source) -> speed, when asked for
    tasks: dict[str, dict]  # model spec -> {task: {metric: value}}, when asked for

    def to_dict(self) -> dict:
        return {"perplexity": {m: p.to_dict() for m, p in self.perplexity.items()},
                "speed": {m: s.to_dict() for m, s in self.speed.items()}, "tasks": self.tasks}


def evaluate(models: list[str], data: str, seq_len: int = 256, stride: int | None = None,
             tokens_per_domain: int | None = 4096, speed: bool = False, tasks: list[str] | None = None,
             task_limit: int | None = None) -> EvalResult:
    """Held-out perplexity per domain for each model (dense or MoE), and optionally speed against the dense source."""
    from transformers import AutoTokenizer

    corpus = load_corpus(data)
    loaded = {spec: load_causal_lm(resolve_model(spec).directory) for spec in models}
    results, task_scores = {}, {}
    for spec, model in loaded.items():
        tok = AutoTokenizer.from_pretrained(resolve_model(spec).directory)
        results[spec] = heldout_perplexity(model, tok, corpus, seq_len, tokens_per_domain, stride)
        if tasks:
            task_scores[spec] = run_tasks(model, tok, tasks, limit=task_limit)
    speeds: dict[str, Speed] = {}
    if speed:
        timed = dict(loaded)
        for spec in models:  # each MoE is timed against the dense model it was built from, in the same run
            plan_json = resolve_model(spec).directory / "moefy_plan.json"
            if plan_json.is_file():
                source = json.loads(plan_json.read_text())["source"]
                timed.setdefault(source, load_causal_lm(resolve_model(source).directory))
        probe = torch.randint(0, next(iter(timed.values())).config.vocab_size, (4, seq_len),
                              generator=torch.Generator().manual_seed(0))
        speeds = measure_speed(timed, probe)
    return EvalResult(results, speeds, task_scores)


def analyze(model: str, data: str, out: Path, seq_len: int = 256, tokens_per_domain: int | None = 2048,
            overwrite: bool = False) -> dict[str, Path]:
    """Routing statistics per layer × domain from one forward pass with router-logit capture."""
    from transformers import AutoTokenizer

    from moefy.analyze.report import write_report  # matplotlib: imported only when a report is written
    from moefy.analyze.routing import layer_routing

    out = Path(out)
    check_output(out, overwrite)
    directory = resolve_model(model).directory
    moe = load_causal_lm(directory)
    moe_layers = [i for i, layer in enumerate(moe.model.layers) if hasattr(layer.mlp, "gate")]
    if not moe_layers:
        raise MoefyError(f"{model} has no routers to analyse (model_type {moe.config.model_type!r}); "
                         "analyze takes an MoE such as a moefy build output")
    blocks = token_blocks(load_corpus(data), AutoTokenizer.from_pretrained(directory), seq_len, tokens_per_domain, 0)
    logits: dict[int, dict[str, list]] = {i: {d: [] for d in blocks.domains} for i in moe_layers}
    with torch.no_grad():
        for d in progress(blocks.domains, "routing"):
            for s in range(0, len(blocks.blocks[d]), 8):
                router = moe(input_ids=blocks.blocks[d][s:s + 8], output_router_logits=True).router_logits
                for i, layer_logits in zip(moe_layers, router):
                    logits[i][d].append(layer_logits)
    top_k = moe.model.layers[moe_layers[0]].mlp.gate.top_k
    layers = [layer_routing(i, {d: torch.cat(v) for d, v in logits[i].items()}, top_k) for i in moe_layers]
    with atomic_output(out, overwrite) as tmp:
        paths = write_report(tmp, model, layers, blocks.domains,
                             {d: int(blocks.blocks[d].numel()) for d in blocks.domains}, top_k,
                             moe.model.layers[moe_layers[0]].mlp.gate.weight.shape[0])
    return {k: out / p.name for k, p in paths.items()}


def filter_corpus(corpus: str | Path, recipe_path: Path | None, overrides: dict, out: Path,
                  overwrite: bool = False) -> dict:
    """Score and filter a corpus (fluency, advertisements); writes the kept corpus, dropped.jsonl and a report."""
    from moefy.data.filtering import FilterRecipe
    from moefy.data.filtering import filter_corpus as run_filter

    recipe = load_recipe(FilterRecipe, recipe_path, overrides)
    return run_filter(Path(corpus), recipe, Path(out), overwrite)


def load_train_recipe(recipe: Path | str):
    """A training recipe from a YAML file, or a built-in preset by name (e.g. `dive`)."""
    from moefy.train.presets import PRESETS
    from moefy.train.recipe import TrainRecipe

    if str(recipe) in PRESETS and not Path(recipe).exists():
        return validate_recipe(TrainRecipe, {"preset": str(recipe)})
    return load_recipe(TrainRecipe, Path(recipe), {})


def train(moe_dir: Path | None, data: str | None, recipe_path: Path | None, out: Path, heldout: str | None = None,
          resume: bool = False, overwrite: bool = False) -> Path:
    """Train a built MoE through the recipe's stages; returns the exported checkpoint (out/final).

    With resume=True only `out` is needed: the run directory records the MoE, the data and the recipe."""
    from moefy.train.loop import train as run_training
    from moefy.train.plots import plot_run
    from moefy.train.recipe import TrainRecipe

    from accelerate import PartialState

    out = Path(out)
    process = PartialState(cpu=not torch.cuda.is_available())  # one process, or one of a torchrun/accelerate launch
    if not resume and process.is_main_process:  # only the main process creates the run directory
        if moe_dir is None or data is None or recipe_path is None:
            raise MoefyError("train needs MOE_DIR, --data and --recipe (or --resume RUN_DIR)")
        check_output(out, overwrite)
        recipe = load_train_recipe(recipe_path)
        plan_json = Path(moe_dir) / "moefy_plan.json"
        source = json.loads(plan_json.read_text())["source"] if plan_json.is_file() else None
        spec = {"moe_dir": str(Path(moe_dir).resolve()), "data": str(data), "heldout": str(heldout or data),
                "dense": source}
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / RUN_JSON).write_text(json.dumps(spec, indent=2))
        dump_recipe(recipe, out / "moefy_train.yaml")
    process.wait_for_everyone()
    if not (out / RUN_JSON).is_file():
        raise MoefyError(f"{out} is not a moefy training run (no {RUN_JSON}); nothing to resume")
    spec = json.loads((out / RUN_JSON).read_text())
    recipe = load_recipe(TrainRecipe, out / "moefy_train.yaml", {})
    data = spec["data"]
    if recipe.filter is not None:  # the recipe's filter stage: run once, reused on resume
        from moefy.data.filtering import SMALL_SCORER
        from moefy.data.filtering import filter_corpus as run_filter

        if process.is_main_process and not (out / "filtered" / "report" / "report.json").is_file():
            run_filter(Path(data), recipe.filter, out / "filtered", overwrite=True,
                       default_model=spec["dense"] or SMALL_SCORER)  # fluency under the MoE's own dense source
        process.wait_for_everyone()
        data = str(out / "filtered")
    moe = resolve_model(spec["moe_dir"]).directory
    dense = resolve_model(spec["dense"]).directory if spec["dense"] else None
    final = run_training(moe, recipe, load_corpus(data), load_corpus(spec["heldout"]), out, dense, resume)
    if process.is_main_process:
        plot_run(out)
    return final
