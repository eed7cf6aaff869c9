"""The Python API. Each CLI verb is a thin call into one function here."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moefy.atomic import atomic_file, atomic_output, check_not_input, check_output, claim, swap_into_place
from moefy.construct.dive_mining import MINING_DIR, mine, settle_domains
from moefy.construct.placement import moe_layers
from moefy.construct.plan import PLAN_JSON, MoEPlan, load_plan
from moefy.construct.recipe import BuildRecipe, ReconstructOptions
from moefy.construct.reconstruct import SPILL_DIR, reconstruct, save_fits
from moefy.construct.registry import make_plan, resolve_defaults
from moefy.data.corpus import load_corpus
from moefy.data.generate import SELF_DOMAIN, sample_texts, write_texts
from moefy.data.tokens import token_blocks
from moefy.errors import MoefyError, check_at_least
from moefy.evaluate.compare import EvalResult, evaluate
from moefy.export import llama_cpp
from moefy.export.card import write_card
from moefy.export.checkpoint import write_checkpoint
from moefy.export.formats import choose_format
from moefy.export.oracle import active_fraction
from moefy.export.to_gguf import OUTTYPES, GgufSummary, TiledSplit, exportable, stage, summarize, tiled_split
from moefy.export.verify import VerifyReport, verify
from moefy.families import family_for
from moefy.models import compute_device, inference_dtype, load_causal_lm, load_tokenizer
from moefy.profile.runner import profile_cached
from moefy.profile.stats import NeuronStats
from moefy.progress import progress
from moefy.recipes import BUILD_RECIPE, TRAIN_RECIPE, dump_recipe, load_recipe
from moefy.sources import ALIASES, SIDE_FILES, resolve_model
from moefy.tensor_io import LazyCheckpoint

__all__ = ["BuildResult", "build", "reconstruct_built", "verify", "VerifyReport", "EvalResult", "evaluate",
           "analyze", "train", "filter_corpus", "export_gguf"]
RUN_JSON = "run.json"
RECONSTRUCTED = "reconstructed"  # a training run's reconstruction stage writes its MoE here


@dataclass(frozen=True)
class BuildResult:
    out: Path
    plan: MoEPlan
    architecture: str
    total_params: int
    active_params: int
    dense_params: int
    reconstruction: list | None = None  # per MoE layer: LayerFit (error before and after), when reconstructed

    @property
    def active_fraction(self) -> float:
        """FFN neurons each token computes (shared block and top-k experts) ÷ the dense FFN width."""
        return active_fraction(self.plan)

    @property
    def gguf_split(self) -> TiledSplit | None:
        """The nearest split whose experts a K-quant GGUF runs through llama.cpp's tiled kernel, when this build's
        experts miss it and other flags would help; None otherwise (export.to_gguf.tiled_split)."""
        return tiled_split(self.plan.meta, self.active_fraction)


def build(recipe: BuildRecipe, out: Path, overwrite: bool = False) -> BuildResult:
    """Split a dense checkpoint's FFNs into experts and write a standard HF MoE checkpoint to `out`."""
    out = Path(out)
    # Local paths are stored absolute, so the plan and the recipe still name the source from another directory.
    recipe = resolve_defaults(recipe).model_copy(update={"model": _absolute(recipe.model)})
    # The temp dir and the output lock come first, so a bad or busy --out fails before any expensive work; the
    # user's existing output is replaced only by the final rename.
    with atomic_output(out, overwrite, inputs=(recipe.model, recipe.calib)) as tmp:
        compute_device(recipe.device)  # a GPU asked for and absent fails here, not after minutes of work
        source = resolve_model(recipe.model)
        check_not_input(out, [source.directory])  # an alias or hub id resolves to a directory too
        config = source.config()
        family = family_for(config)
        reader = LazyCheckpoint(source.directory)
        family.check(config, reader.names())
        missing = [k for k in (family.ffn_key(0, w) for w in ("gate", "up", "down")) if k not in reader]
        if missing:
            raise MoefyError(f"{source.directory} does not hold the {family.model_type} FFN weights "
                             f"(missing {missing[0]})")
        stats, mining, extra, calibration = None, None, None, None
        if recipe.method == "dive" and recipe.calib is None:
            raise MoefyError("dive prunes on calibration domains: pass --calib CORPUS")
        if recipe.reconstruct.enabled and recipe.calib is None:
            raise MoefyError("reconstruction fits the experts on calibration data: pass --calib CORPUS")
        if recipe.reconstruct.enabled and recipe.drop_fraction:
            raise MoefyError("reconstruction does not apply to drop-upcycling: its re-initialised neurons are "
                             "meant to be trained, not fitted to the dense FFN")
        if recipe.calib is not None:
            options = _profile_options(recipe)
            corpus = load_corpus(recipe.calib)  # read now, so a bad corpus fails before any work
            calibration = corpus.summary()
            domains = None
            if recipe.method == "dive":  # labelled, discovered or split domains; some documents held out for affinity
                domains = settle_domains(recipe, source, corpus)
                corpus = domains.prune
            # Profiled on first use only: methods and router inits that never read stats skip the calibration pass.
            stats = functools.cache(lambda: profile_cached(source, family, corpus, options, recipe.seed,
                                                              recipe.device, recipe.max_memory))
            if domains is not None:
                layers = moe_layers(recipe.layers, int(config["num_hidden_layers"]))
                mining = mine(recipe, source, family, reader, stats(), domains, layers)
                extra = {"groups": mining.groups, "group_names": mining.group_names()}
        plan = make_plan(recipe, family, config, reader, stats, extra)
        if calibration is not None:  # saved with the plan: what was read, and what was skipped
            plan = MoEPlan(plan.meta.model_copy(update={"calibration": calibration}), plan.layers)
        fits = None
        if recipe.reconstruct.enabled:
            plan, fits = reconstruct(plan, source, family, corpus, recipe.reconstruct, recipe.seed,
                                     recipe.device, spill=tmp / SPILL_DIR, max_memory=recipe.max_memory)
        architecture, total, dense_params = _write_moe(tmp, recipe, source, reader, plan, mining, fits)
    return BuildResult(out, plan, architecture, total, plan.meta.active_params(total), dense_params, fits)


def _write_moe(tmp: Path, recipe: BuildRecipe, source, reader: LazyCheckpoint, plan: MoEPlan, mining, fits
               ) -> tuple[str, int, int]:
    """Everything a build leaves in its output: checkpoint, config, tokenizer, plan, reports, recipe and card;
    returns the architecture, the total and the dense parameter counts."""
    config = source.config()
    family = family_for(config)
    fmt = choose_format(family.formats, plan.meta, config)
    dense_params = sum(_numel(reader.shape(n)) for n in reader.names())
    total = write_checkpoint(reader, family, config, plan, fmt, tmp, recipe.dtype, recipe.max_shard_bytes)
    source_dtype = str(reader.dtype(family.ffn_key(0, "down"))).removeprefix("torch.")
    dtype = recipe.dtype if recipe.dtype != "source" else source_dtype
    model_config = fmt.config(config, plan.meta, dtype)
    (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
    for name in SIDE_FILES:
        if (source.directory / name).is_file():
            shutil.copy2(source.directory / name, tmp / name)
    plan.save(tmp)
    shutil.rmtree(tmp / SPILL_DIR, ignore_errors=True)  # written into the checkpoint by now
    if mining is not None or fits is not None:
        _save_build_reports(tmp, plan, mining, fits)
    dump_recipe(recipe, tmp / BUILD_RECIPE)
    architecture = model_config["architectures"][0]
    write_card(tmp, plan.meta, source.description, architecture, total, dense_params, fits is not None,
               gguf=exportable(model_config))
    return architecture, total, dense_params


def reconstruct_built(moe_dir: Path, data: str, options: ReconstructOptions, out: Path, device: str = "auto",
                      overwrite: bool = False) -> BuildResult:
    """Layer-wise reconstruction of an MoE that moefy built, on `data`: its own plan (partition and routers) is
    fitted to its dense source with the build's seed, and written as a new checkpoint. The result is what `moefy
    build --reconstruct` gives with this corpus, and the recipe saved beside it says so: building from that recipe
    reproduces it. Training's `reconstruct` stage (train recipe) runs this before the first stage."""
    moe_dir = Path(moe_dir)
    plan = load_plan(moe_dir)
    if not (moe_dir / BUILD_RECIPE).is_file():
        raise MoefyError(f"{moe_dir} has no {BUILD_RECIPE}: reconstruction needs the recipe moefy build saved")
    built = load_recipe(BuildRecipe, moe_dir / BUILD_RECIPE, {})
    if built.drop_fraction:
        raise MoefyError("reconstruction does not apply to drop-upcycling: its re-initialised neurons are "
                         "meant to be trained, not fitted to the dense FFN")
    recipe = built.model_copy(update={"calib": _absolute(data), "reconstruct": options.model_copy(
        update={"enabled": True}), "device": device})
    with atomic_output(Path(out), overwrite, inputs=(str(moe_dir), data, plan.meta.source)) as tmp:
        compute_device(device)
        corpus = load_corpus(data)
        source = resolve_model(plan.meta.source)
        family = family_for(source.config())
        reader = LazyCheckpoint(source.directory)
        plan, fits = reconstruct(plan, source, family, corpus, recipe.reconstruct, recipe.seed, device,
                                 spill=tmp / SPILL_DIR, max_memory=recipe.max_memory)  # the build's budget
        architecture, total, dense_params = _write_moe(tmp, recipe, source, reader, plan, None, fits)
    return BuildResult(Path(out), plan, architecture, total, plan.meta.active_params(total), dense_params, fits)


def _profile_options(recipe: BuildRecipe):
    if (recipe.method == "importance" or recipe.dive.score == "taylor") and not recipe.profile.taylor:
        return recipe.profile.model_copy(update={"taylor": True})  # these scores are defined by the Taylor term
    return recipe.profile


def profile(recipe: BuildRecipe) -> NeuronStats:
    """The build's calibration pass alone, into the stats cache, where a build with the same model, corpus, method
    and profile options finds it. Under torchrun it is data-parallel: each process profiles a share of the
    calibration batches (on its own GPU where there are GPUs) and process 0 writes."""
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())  # joins a torchrun launch's process group; alone otherwise
    if recipe.calib is None:
        raise MoefyError("profiling needs calibration data: pass --calib CORPUS")
    if recipe.method == "dive":
        raise MoefyError("dive profiles its own pruning split of the corpus: run moefy build directly")
    compute_device(recipe.device)
    source = resolve_model(_absolute(recipe.model))
    family = family_for(source.config())
    family.check(source.config(), LazyCheckpoint(source.directory).names())
    return profile_cached(source, family, load_corpus(recipe.calib), _profile_options(recipe), recipe.seed,
                          recipe.device, recipe.max_memory)


def _save_build_reports(directory: Path, plan: MoEPlan, mining, fits) -> None:
    """DIVE's mining (mining.json, affinity.png, dendrogram.png) and the reconstruction errors (json + png)."""
    from moefy.analyze.plots import dendrogram_plot, distance_heatmap, reconstruction_plot  # matplotlib: only here

    if mining is not None:
        mining.save(directory / MINING_DIR, plan)
        pictures = directory / MINING_DIR
        distance_heatmap(mining.affinity, mining.domains, "domain affinity (DIVE)", pictures / "affinity.png")
        dendrogram_plot(mining.linkage(), mining.domains, pictures / "dendrogram.png")
    if fits is not None:
        save_fits(directory, fits)
        reconstruction_plot(fits, directory / "reconstruction.png")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def export_gguf(model: str, out: Path, outtype: str = "f16", overwrite: bool = False) -> GgufSummary:
    """A moefy output (or a dense LLaMA) as one GGUF file for llama.cpp / Ollama, through llama.cpp's converter, and
    for a K-quant outtype its quantizer too (that needs llama-cpp-python)."""
    if outtype not in (*OUTTYPES, *llama_cpp.QUANTIZED):
        raise MoefyError(f"--outtype must be one of {', '.join((*OUTTYPES, *llama_cpp.QUANTIZED))} (got {outtype!r})")
    out = Path(out)
    if out.suffix != ".gguf":
        raise MoefyError(f"--out {out} should end in .gguf")
    quantized = outtype in llama_cpp.QUANTIZED
    if quantized:
        llama_cpp.require_runtime(f"--outtype {outtype}")
    directory = resolve_model(model).directory
    llama_cpp.converter_script()  # missing converter: say so before any work
    with atomic_file(out, overwrite, inputs=(model,)) as tmp_file:
        staged = tmp_file.parent / "hf"
        arch = stage(directory, staged)
        converted = tmp_file.parent / "f16.gguf" if quantized else tmp_file
        llama_cpp.convert(staged, converted, "f16" if quantized else outtype)
        if quantized:
            llama_cpp.quantize(converted, tmp_file, outtype)
        summary = summarize(tmp_file, outtype)
        if summary.architecture != arch:
            raise MoefyError(f"the converter wrote a {summary.architecture!r} GGUF where {arch!r} was expected")
    return dataclasses.replace(summary, path=out)


def analyze(model: str, data: str, out: Path, seq_len: int = 256, tokens_per_domain: int | None = 2048,
            overwrite: bool = False) -> dict[str, Path]:
    """Routing statistics per layer × domain from one forward pass with router-logit capture."""
    check_at_least(2, seq_len=seq_len)
    check_at_least(1, tokens_per_domain=tokens_per_domain)

    from moefy.analyze.report import (
        write_report,  # matplotlib: imported only when a report is written
    )
    from moefy.analyze.routing import layer_routing

    out = Path(out)
    check_output(out, overwrite, inputs=(model, data))
    directory = resolve_model(model).directory
    moe = load_causal_lm(directory)
    moe_layers = [i for i, layer in enumerate(moe.model.layers) if hasattr(layer.mlp, "gate")]
    if not moe_layers:
        raise MoefyError(f"{model} has no routers to analyse (model_type {moe.config.model_type!r}); "
                         "analyze takes an MoE such as a moefy build output")
    blocks = token_blocks(load_corpus(data), load_tokenizer(directory), seq_len, tokens_per_domain, 0)
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


def generate_calibration(model: str, out: Path, tokens: int, seq_len: int = 256, seed: int = 0,
                         temperature: float = 1.0, domain: str = SELF_DOMAIN, batch_size: int = 32,
                         device: str = "auto", overwrite: bool = False, domains: int = 1) -> Path:
    """Calibration text sampled from the dense model (data.generate), as a JSONL file of `domains` domains to put
    beside the user's calibration files: a build fitted on it keeps more of the model's quality outside the
    calibration domains."""
    out = Path(out)
    if out.suffix != ".jsonl":
        raise MoefyError(f"--out {out} should end in .jsonl (a file of a calibration corpus)")
    check_at_least(1, tokens=tokens, seq_len=seq_len, batch_size=batch_size, domains=domains)
    if domains > -(-tokens // seq_len):
        raise MoefyError(f"--domains {domains} is more than the {-(-tokens // seq_len)} texts that --tokens {tokens} "
                         f"makes at --seq-len {seq_len}")
    if temperature <= 0:
        raise MoefyError(f"--temperature must be positive (got {temperature})")
    with atomic_file(out, overwrite, inputs=(model,)) as tmp_file:  # an existing file is refused before any work
        directory = resolve_model(model).directory
        target = compute_device(device)
        lm = load_causal_lm(directory, inference_dtype(target)).to(target)
        texts = sample_texts(lm, load_tokenizer(directory), tokens, seq_len, batch_size, seed, temperature)
        # the batch size and the device are settings of the texts, not only of the speed: a batch's sequences draw
        # from one RNG stream, and each device type has its own RNG and dtype, so the same seed samples other texts
        write_texts(texts, tmp_file, domain, {"model": model, "seed": seed, "temperature": temperature,
                                              "seq_len": seq_len, "batch_size": batch_size, "device": target.type},
                    domains)
    return out


def filter_corpus(corpus: str | Path, recipe_path: Path | None, overrides: dict, out: Path,
                  overwrite: bool = False) -> dict:
    """Score and filter a corpus (fluency, advertisements); writes the kept corpus, dropped.jsonl and a report."""
    from moefy.data.filtering import FilterRecipe
    from moefy.data.filtering import filter_corpus as run_filter

    recipe = load_recipe(FilterRecipe, recipe_path, overrides)
    return run_filter(Path(corpus), recipe, Path(out), overwrite)


def train(moe_dir: Path | None, data: str | None, recipe_path: Path | str | None, out: Path,
          heldout: str | None = None, resume: bool = False, overwrite: bool = False,
          overrides: dict | None = None) -> Path:
    """Train a built MoE through the recipe's stages; returns the exported checkpoint (out/final).

    recipe_path: a YAML recipe or a preset name; overrides: recipe fields on top of it (the CLI's flags), where
    overrides["stage"] sets every stage, or is the one stage when there is no recipe. With resume=True only `out`
    is needed: the run directory records the MoE, the data and the resolved recipe."""
    from accelerate import PartialState

    from moefy.train.recipe import load_train_recipe

    out = Path(out)
    process = PartialState(cpu=not torch.cuda.is_available())  # one process, or one of a torchrun/accelerate launch
    if resume and overrides:
        raise MoefyError("a resumed run keeps the recipe it started with: drop the recipe options")
    if not resume and process.is_main_process:  # only the main process checks inputs and creates the run
        if moe_dir is None or data is None:
            raise MoefyError("train needs MOE_DIR and --data (or --resume RUN_DIR)")
        recipe = load_train_recipe(recipe_path, overrides)  # validated before any file is looked at
        _check_processes(recipe)
        # Every input is checked before the run directory is touched.
        check_output(out, overwrite, inputs=(moe_dir, data, heldout))
        moe_source = resolve_model(str(moe_dir))
        # Read now, so a bad corpus fails before the run directory is touched; what was skipped goes in run.json.
        read = {"data": load_corpus(data).summary(), "heldout": load_corpus(heldout or data).summary()}
        plan_json = moe_source.directory / PLAN_JSON
        source = json.loads(plan_json.read_text())["source"] if plan_json.is_file() else None
        if recipe.reconstruct.enabled and not (source and (moe_source.directory / BUILD_RECIPE).is_file()):
            raise MoefyError(f"the recipe reconstructs the MoE, but {moe_dir} has no moefy plan and build recipe: "
                             "reconstruction refits a moefy build to its dense source")
        # Absolute paths: a run resumed from another directory must find the same model and data.
        spec = {"moe_dir": str(moe_source.directory.resolve()), "data": _absolute(data),
                "heldout": _absolute(heldout or data), "dense": source, "read": read}
    with claim(out) if process.is_main_process else contextlib.nullcontext():
        if not resume and process.is_main_process:
            check_output(out, overwrite)  # again: the claim may have put back an interrupted old output
            # A replaced run trains beside the old one, which stays until the new one is complete.
            run = _staging(out) if out.exists() else out
            if run.exists():  # a killed earlier replacement of this run: this fresh run supersedes it
                shutil.rmtree(run)
            run.mkdir(parents=True)
            (run / RUN_JSON).write_text(json.dumps(spec, indent=2))
            dump_recipe(recipe, run / TRAIN_RECIPE)
        process.wait_for_everyone()
        run = _resumable_run(out)
        final = _run_training(run, process, resume)
        if run != out and process.is_main_process:
            swap_into_place(run, out, overwrite=True)
            final = out / final.name
        process.wait_for_everyone()
    return out / final.name


def _check_processes(recipe) -> None:
    """What this process setup cannot train (DeepSpeed), refused before the run exists. The loop checks again, for
    a resumed run."""
    from moefy.train.loop import make_accelerator
    from moefy.train.sharding import check_supported

    check_supported(make_accelerator(recipe))


def _absolute(spec: str) -> str:
    """A local path as an absolute path; anything else (an alias, a hub id) as given, as resolve_model reads it."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec not in ALIASES and path.exists() else spec


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.moefy-next"


def _resumable_run(out: Path) -> Path:
    """The run to resume: an unfinished replacement of `out` if there is one, else `out` itself."""
    for run in (_staging(out), out):
        if (run / RUN_JSON).is_file():
            return run
    raise MoefyError(f"{out} is not a moefy training run (no {RUN_JSON}); nothing to resume")


def _run_training(run: Path, process, resume: bool) -> Path:
    from moefy.train.loop import train as run_training
    from moefy.train.plots import plot_run
    from moefy.train.recipe import TrainRecipe

    try:
        spec = json.loads((run / RUN_JSON).read_text())
    except (ValueError, OSError) as exc:
        raise MoefyError(f"corrupt {run / RUN_JSON}: {exc}") from exc
    recipe = load_recipe(TrainRecipe, run / TRAIN_RECIPE, {})
    data = spec["data"]
    if recipe.filter is not None:  # the recipe's filter stage: run once, reused on resume
        from moefy.data.filtering import SMALL_SCORER
        from moefy.data.filtering import filter_corpus as run_filter

        if process.is_main_process and not (run / "filtered" / "report" / "report.json").is_file():
            run_filter(Path(data), recipe.filter, run / "filtered", overwrite=True,
                       default_model=spec["dense"] or SMALL_SCORER)  # fluency under the MoE's own dense source
        process.wait_for_everyone()
        data = str(run / "filtered")
    moe = resolve_model(spec["moe_dir"]).directory
    if recipe.reconstruct.enabled:  # the recipe's reconstruction stage: run once, reused on resume
        if process.is_main_process and not (run / RECONSTRUCTED / "config.json").is_file():
            reconstruct_built(moe, data, recipe.reconstruct, run / RECONSTRUCTED, overwrite=True)
        process.wait_for_everyone()
        moe = run / RECONSTRUCTED
    dense = resolve_model(spec["dense"]).directory if spec["dense"] else None
    final = run_training(moe, recipe, load_corpus(data), load_corpus(spec["heldout"]), run, dense,
                         resume)
    if process.is_main_process:
        plot_run(run)
    return final
