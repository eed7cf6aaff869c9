"""The `moefy` command line: one verb per stage, each a thin wrapper over moefy.api."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moefy.construct.recipe import BuildRecipe
from moefy.data.filtering import FilterRecipe
from moefy.data.generate import SELF_DOMAIN, domain_names
from moefy.errors import MoefyError
from moefy.evaluate.options import EXPERTS_IMPLEMENTATIONS
from moefy.recipe_flags import add_recipe_flags, recipe_overrides
from moefy.recipes import load_recipe
from moefy.train.recipe import Stage, TrainRecipe


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 like every other moefy error."""

    def error(self, message: str):
        print(f"moefy: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moefy", description="Turn a dense LLaMA-family LLM into an MoE.")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="split a dense checkpoint's FFNs into experts (Mixtral or Qwen2-MoE output)")
    b.add_argument("model", nargs="?", help="local HF dir, .gguf file, hub id, or alias (smollm2-135m)")
    b.add_argument("--recipe", type=Path, help="YAML build recipe; command-line options override its fields")
    b.add_argument("--out", type=Path, help="output directory (must not exist unless --overwrite)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b.add_argument("--profile-only", action="store_true", dest="profile_only",
                   help="run only the calibration pass into the stats cache, which a later build with the same "
                   "options reuses; data-parallel under torchrun (docs/scale-out.md)")
    add_recipe_flags(b, BuildRecipe, skip=("model",))  # every recipe field: --experts, --method, --reconstruct-steps…

    t = sub.add_parser("train", help="train a built MoE through the stages of a recipe (or --resume a run)")
    t.add_argument("moe_dir", nargs="?", type=Path, help="the MoE to train (a moefy build output); not with --resume")
    t.add_argument("--data", help="training corpus (domains = streams)")
    t.add_argument("--heldout", help="held-out corpus for dynamic mixtures (default: --data)")
    t.add_argument("--recipe", help="training recipe YAML (stages), or a preset name: dive; the options below "
                   "override its fields, the stage options in every stage. Without it, the stage options (--tokens "
                   "at least) are the one stage trained")
    t.add_argument("--out", type=Path, help="run directory")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new run is "
                   "complete)")
    # The data filter before training stays in the recipe YAML (or `moefy data filter` first): its flags are
    # `moefy data filter`'s, and a second copy here would collide with --data.
    add_recipe_flags(t, TrainRecipe, skip=("stages", "filter"))  # --seed, --checkpoint-every, --reconstruct…
    add_recipe_flags(t, Stage, under=("stage",))  # --trainable, --tokens, --lr, --lora-rank, --distill…

    d = sub.add_parser("data", help="corpus tools")
    dsub = d.add_subparsers(dest="data_verb", required=True, parser_class=_Parser)
    dc = dsub.add_parser("demo-corpus", help="write the built-in 4-domain demo corpus (calib/, heldout/ and unseen/)")
    dc.add_argument("out", type=Path, help="directory to write (must not exist unless --overwrite)")
    dc.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    dg = dsub.add_parser("generate", help="sample calibration text from the dense model itself (a JSONL file of "
                         "one or more domains to add to --calib: keeps more quality outside the calibration domains)")
    dg.add_argument("model", help="local HF dir, .gguf file, hub id, or alias (smollm2-135m)")
    dg.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    dg.add_argument("--tokens", type=int, default=16384, help="tokens to sample (default %(default)s)")
    dg.add_argument("--seq-len", type=int, default=256, dest="seq_len", help="tokens per sampled text")
    dg.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default %(default)s: the "
                    "model's own distribution)")
    dg.add_argument("--domain", default=SELF_DOMAIN, help=f"the records' domain (default {SELF_DOMAIN!r})")
    dg.add_argument("--domains", type=int, default=1, help="split the texts over this many domains (NAME-1 … "
                    "NAME-N): a build budgets calibration tokens per domain, so sample N × the per-domain budget "
                    "and split it N ways to use it all (default 1)")
    dg.add_argument("--batch-size", type=int, default=32, dest="batch_size", help="texts sampled at once")
    dg.add_argument("--seed", type=int, default=0, help="seeds the sampling (default 0)")
    dg.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda[:N]")
    dg.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    df = dsub.add_parser("filter", help="drop disfluent and advertisement-like documents; kept corpus + report")
    df.add_argument("corpus", help=".jsonl/.parquet/.txt file or a directory of them")
    df.add_argument("--out", type=Path, required=True, help="output directory (data/, dropped.jsonl, report/)")
    df.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    df.add_argument("--recipe", type=Path, help="YAML filter recipe; the options below override its fields")
    add_recipe_flags(df, FilterRecipe)  # --fluency, --ads, --domains, --drop-quantile, --threshold, --cache…
    tc = dsub.add_parser("train-classifier", help="train a fastText ad/quality classifier from labelled JSONL")
    tc.add_argument("labelled", type=Path, help="JSONL with 'text' and 'label' fields")
    tc.add_argument("--out", type=Path, required=True, help="classifier directory (model.bin, report.json)")
    tc.add_argument("--positive", default="ad", help="the label to score (default 'ad')")
    tc.add_argument("--label-field", default="label", dest="label_field", help="the field holding each record's "
                    "label (default 'label')")
    tc.add_argument("--heldout", type=float, default=0.2, help="held-out fraction for the quality report")
    tc.add_argument("--epochs", type=int, default=25, help="fastText training epochs (default 25)")
    tc.add_argument("--seed", type=int, default=0, help="seeds the held-out split and fastText (default 0)")
    tc.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    e = sub.add_parser("eval", help="held-out perplexity per domain (dense and MoE side by side), optionally speed")
    e.add_argument("models", nargs="+", help="models to compare: dirs, .gguf (dequantised into transformers), hub "
                   "ids, aliases; llama.cpp:FILE.gguf scores that file in llama.cpp (make setup-llama)")
    e.add_argument("--data", required=True, help="held-out corpus (.jsonl/.parquet/.txt or a directory)")
    e.add_argument("--seq-len", type=int, default=256, dest="seq_len", help="context length (default 256)")
    e.add_argument("--stride", type=int, help="sliding-window stride (default: the context length)")
    e.add_argument("--tokens-per-domain", type=int, default=4096, dest="tokens_per_domain",
                   help="held-out tokens scored per domain (default 4096)")
    e.add_argument("--speed", action="store_true", help="also prompt tokens/s (scored: every position's logits; "
                   "prefilled: the last one's, as generation and llama-bench do) and generation tokens/s, each MoE ÷ "
                   "its dense source in the same run (llama.cpp rows ÷ the first llama.cpp model listed)")
    e.add_argument("--oracle", action="store_true", help="also each moefy build's expert oracle (its partition, ideal "
                   "routing) and neuron oracle (each token's own top neurons, same active fraction), run inside its "
                   "dense source on the same corpus: how much is lost to routing, how much to the partition; and its "
                   "routing oracle (its own experts, each token's best k of them)")
    e.add_argument("--experts-impl", choices=EXPERTS_IMPLEMENTATIONS, dest="experts_impl",
                   help="run the transformers MoEs with this experts kernel, as from_pretrained(DIR, "
                   "experts_implementation=...) would (default: transformers' own choice, grouped_mm); on a CPU eager "
                   "runs long prompts faster and grouped_mm generates faster (docs/results.md, experts-impl)")
    e.add_argument("--compile", action="store_true", help="with --speed: time the transformers models (MoEs and "
                   "dense sources alike) compiled by torch.compile, generating on a static KV cache; compiling takes "
                   "a minute or more per model on a laptop CPU and needs a C++ compiler; not with --experts-impl eager")
    e.add_argument("--tasks", help="comma list of lm-eval task names (need a network) or local task YAML paths")
    e.add_argument("--task-limit", type=int, dest="task_limit", help="at most this many examples per task")
    e.add_argument("--json", type=Path, dest="json_out", help="also write every number to this JSON file")

    a = sub.add_parser("analyze", help="routing statistics per layer × domain, plots and an HTML report")
    a.add_argument("model", help="an MoE: a moefy output directory, or another Mixtral or Qwen2-MoE checkpoint")
    a.add_argument("--data", required=True, help="corpus with a domain per document")
    a.add_argument("--out", type=Path, required=True, help="report directory")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a.add_argument("--seq-len", type=int, default=256, dest="seq_len", help="context length (default 256)")
    a.add_argument("--tokens-per-domain", type=int, default=2048, dest="tokens_per_domain",
                   help="tokens routed per domain (default 2048)")

    g = sub.add_parser("export-gguf", help="write a GGUF for llama.cpp / Ollama (through llama.cpp's own converter)")
    g.add_argument("model", help="a moefy output directory, or a dense LLaMA (same forms as build)")
    g.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    g.add_argument("--outtype", default="f16", help="f32, f16 (default), bf16 or q8_0 (llama.cpp's converter); "
                   "q4_k_m, q5_k_m or q6_k (its quantizer on the f16 file; needs llama-cpp-python: make setup-llama). "
                   "A K-quant needs rows that are a multiple of 256 wide; others keep another type, listed after")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    sub.add_parser("fetch-converter", help="download llama.cpp's HF->GGUF converter (from the pinned "
                   "llama-cpp-python sdist on PyPI) into the moefy cache")

    v = sub.add_parser("verify", help="check the exactness invariant of a built MoE against its dense source")
    v.add_argument("moe_dir", type=Path, help="a moefy build output")
    v.add_argument("--dense", required=True, help="the dense source model (same forms as build)")
    v.add_argument("--tolerance", type=float, default=1e-3,
                   help="max |Δlogits| allowed per 10 units of logit magnitude (default 1e-3)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _cmd_build(args: argparse.Namespace) -> int:
    from moefy import api

    overrides = {**recipe_overrides(args), "model": args.model}
    if args.recipe is None and args.model is None:
        raise MoefyError("build needs a MODEL or a --recipe")
    recipe = load_recipe(BuildRecipe, args.recipe, overrides)
    if args.profile_only:
        stats = api.profile(recipe)
        if int(os.environ.get("RANK", "0")) == 0:
            m = stats.meta
            print(f"calibration stats: {stats.directory} ({m.num_layers} layers, {sum(m.tokens)} tokens over "
                  f"{len(m.domains)} domains); a build with the same model, --calib, method and profile options "
                  "reuses them")
        return 0
    if args.out is None:
        raise MoefyError("build needs --out DIR (or --profile-only)")
    result = api.build(recipe, args.out, overwrite=args.overwrite)
    _print_build(result)
    return 0


def _print_build(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from moefy.export.card import params_summary
    from moefy.export.oracle import active_neurons
    from moefy.export.to_gguf import K_QUANT_BLOCK

    m = result.plan.meta
    table = Table(title=f"moefy build → {result.out}", show_header=False)
    layer = next(iter(result.plan.layers.values()))
    sizes = layer.expert_sizes
    lo, hi = int(sizes.min()), int(sizes.max())
    padding = "" if lo == m.expert_size else f" ({lo if lo == hi else f'{lo}-{hi}'} real, zero-padded)"
    shared = len(layer.shared_neurons)
    active = active_neurons(result.plan)  # in each MoE layer (the row after it says which layers are)
    for k, v in [("architecture", result.architecture), ("method", m.method),
                 ("experts", f"{m.num_experts} (top-{m.top_k}), {m.expert_size} neurons each{padding}"),
                 *([("shared block", f"{shared} neurons, always on")] if shared else []),
                 ("active FFN", f"{active:g} of {m.ffn_width} neurons per token ({active / m.ffn_width:.1%})"),
                 ("MoE layers", f"{len(m.moe_layers)} of {m.num_layers}"), ("scale", f"{m.scales[0]:g}"),
                 ("params", params_summary(result.total_params, result.active_params, result.dense_params))]:
        table.add_row(k, v)
    if result.reconstruction:
        from statistics import mean

        fits = result.reconstruction
        table.add_row("reconstruction (layer nMSE)", f"mean {mean([f.before for f in fits]):.3f} → "
                      f"{mean([f.after for f in fits]):.3f}; worst {max(f.after for f in fits):.3f} "
                      f"(layer {max(fits, key=lambda f: f.after).layer}); per layer in reconstruction.json")
    Console().print(table)
    # wide models only: at a hidden size that is a multiple of 256, the expert width alone decides whether a K-quant
    # GGUF runs its experts through llama.cpp's tiled kernel (export-gguf's note says the same after the fact)
    tiled = result.gguf_split
    if tiled:
        print(f"note: experts of {m.expert_size} neurons are not a multiple of {K_QUANT_BLOCK}, so a K-quant GGUF "
              "(export-gguf --outtype q4_k_m) keeps their down projections in a type llama.cpp runs without its tiled "
              f"MoE kernel. Rebuild with {tiled.flags(m.ffn_width, m.shared_size > 0)} for experts of "
              f"{tiled.expert_size} at {tiled.active:.1%} active (this build: {result.active_fraction:.1%}).")


def _cmd_verify(args: argparse.Namespace) -> int:
    from moefy import api

    report = api.verify(args.moe_dir, args.dense, tolerance=args.tolerance)
    if args.json:
        print(report.to_json())
    else:
        _print_verify(report)
    if not report.passed:
        print(f"moefy: error: exactness check failed: max |Δlogits| {report.max_abs_dlogits:.3g} "
              f">= allowed {report.allowed:.3g} (tolerance {report.tolerance:g} per 10 of logit scale "
              f"{report.logit_scale:.3g})", file=sys.stderr)
        return 1
    return 0


def _print_verify(r) -> None:
    from rich.console import Console
    from rich.table import Table

    from moefy.export.card import param_count

    table = Table(title="moefy verify", show_header=False)
    what = ("all experts, uniform router" if r.check == "uniform"
            else "each token through one expert alone vs dense restricted to it")
    for k, v in [(f"exactness: max |Δlogits| ({what})",
                  f"{r.max_abs_dlogits:.2e} ({'PASS' if r.passed else 'FAIL'} < {r.allowed:.2g})"),
                 ("loss: dense / checked MoE", f"{r.dense_loss:.4f} / {r.uniform_moe_loss:.4f}"),
                 ("probe perplexity: dense / MoE as built", f"{r.dense_ppl:.2f} / {r.built_moe_ppl:.4g} "
                                                            f"(×{r.built_moe_ppl / r.dense_ppl:.2f})"),
                 (f"oracles at {r.active_fraction:.0%} active: experts / neurons",
                  f"{r.expert_oracle_ppl:.4g} (×{r.expert_oracle_ppl / r.dense_ppl:.2f}) / "
                  f"{r.neuron_oracle_ppl:.4g} (×{r.neuron_oracle_ppl / r.dense_ppl:.2f})"),
                 ("routing decisions near-tied / changed by a bf16 router",
                  f"{r.near_tie_fraction:.1%} / {r.bf16_flip_fraction:.1%}"),
                 ("vLLM: config fields and tensor names it reads", "; ".join(r.vllm_problems) or "all present"),
                 ("probe tokens", str(r.tokens)),
                 ("params: MoE total / active / dense",
                  " / ".join(map(param_count, (r.total_params, r.active_params, r.dense_params))))]:
        table.add_row(k, v)
    Console().print(table)


def _cmd_data(args: argparse.Namespace) -> int:
    from moefy.data.demo_corpus import build_demo_corpus

    if args.data_verb == "filter":
        return _cmd_filter(args)
    if args.data_verb == "train-classifier":
        return _cmd_train_classifier(args)
    if args.data_verb == "generate":
        return _cmd_generate(args)
    counts = build_demo_corpus(args.out, overwrite=args.overwrite)
    for domain, c in counts.items():
        print(f"{domain:12s} " + "   ".join(f"{split} {n:4d} docs" for split, n in c.items()))
    print(f"wrote {args.out}/calib, {args.out}/heldout and {args.out}/unseen")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from moefy import api

    out = api.generate_calibration(args.model, args.out, args.tokens, seq_len=args.seq_len, seed=args.seed,
                                   temperature=args.temperature, domain=args.domain, batch_size=args.batch_size,
                                   device=args.device, overwrite=args.overwrite, domains=args.domains)
    names = domain_names(args.domain, args.domains)
    labels = repr(names[0]) if len(names) == 1 else f"{names[0]!r} … {names[-1]!r}"
    print(f"wrote {out}: about {args.tokens} tokens sampled from {args.model} (domain {labels}); put it "
          "beside your calibration files")
    return 0


def _cmd_filter(args: argparse.Namespace) -> int:
    from moefy import api

    summary = api.filter_corpus(args.corpus, args.recipe, recipe_overrides(args), args.out, overwrite=args.overwrite)
    for domain, c in summary["per_domain"].items():
        print(f"{domain:16s} kept {c['kept']:6d}   dropped {c['dropped']:6d}")
    if summary["malformed"]:
        print("malformed records (dropped, in dropped.jsonl): "
              + ", ".join(f"{n} {why}" for why, n in summary["malformed"].items()))
    print(f"kept corpus in {args.out / 'data'}; dropped in {args.out / 'dropped.jsonl'}; "
          f"report {args.out / 'report' / 'report.md'}")
    return 0


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from moefy.data.scoring.classifier import train_classifier

    r = train_classifier(args.labelled, args.out, args.positive, args.label_field, heldout=args.heldout,
                         epochs=args.epochs, seed=args.seed, overwrite=args.overwrite)
    print(f"classifier {args.out}: held-out ({r.heldout_examples} examples, '{r.positive}' at p ≥ {r.threshold}): "
          f"precision {r.precision:.3f}  recall {r.recall:.3f}  F1 {r.f1:.3f}  accuracy {r.accuracy:.3f}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from moefy import api
    from moefy.atomic import check_writable
    from moefy.export.card import param_count

    tasks = args.tasks.split(",") if args.tasks else None
    if args.json_out:  # checked now, not after the whole evaluation
        if args.json_out.is_dir():
            raise MoefyError(f"--json {args.json_out} is a directory; give a file name")
        check_writable(args.json_out)
    result = api.evaluate(args.models, args.data, seq_len=args.seq_len, stride=args.stride,
                          tokens_per_domain=args.tokens_per_domain, speed=args.speed, tasks=tasks,
                          task_limit=args.task_limit, oracle=args.oracle, experts_implementation=args.experts_impl,
                          compiled=args.compile)
    first = next(iter(result.perplexity.values()))
    table = Table(title=f"held-out perplexity (context {first.seq_len}, stride {first.stride})")
    table.add_column("domain")
    columns = {m: result.perplexity[m] for m in args.models}
    for m, o in result.oracles.items():
        columns[f"{m}: expert oracle"] = o.expert
        columns[f"{m}: neuron oracle at {o.active_fraction:.0%}"] = o.neuron
        columns[f"{m}: routing oracle (own experts)"] = o.routing
    for name in columns:
        table.add_column(name, justify="right")
    for d in [*first.per_domain, None]:
        table.add_row(d or "overall", *[f"{ppl.ppl(d):.3f}" for ppl in columns.values()])
    console = Console()
    console.print(table)
    if result.speed:
        kernel = result.experts_implementation or "transformers' default"
        how = "compiled (torch.compile, static KV cache)" if result.compiled else "not compiled"
        speed = Table(title=f"speed (same run; medians of interleaved repeats; MoE experts kernel: {kernel}; {how})")
        for col in ("model", "score tok/s (all logits)", "prefill tok/s (last logits)", "generate tok/s",
                    "÷ baseline (score / prefill / gen)", "active params/token", "active / total",
                    *(["compile s"] if result.compiled else [])):
            speed.add_column(col, justify="right")
        for m, s in result.speed.items():
            ratios = " / ".join(f"{r:.2f}×" for r in result.speed_ratio(m).values())
            compile_s = [] if not result.compiled else ["–" if s.compile_s is None else f"{s.compile_s:.0f}"]
            speed.add_row(m, f"{s.forward_tokens_per_s:.0f}", f"{s.prefill_tokens_per_s:.0f}",
                          f"{s.generate_tokens_per_s:.1f}", ratios, param_count(s.active_params),
                          f"{s.active_params / s.total_params:.2f}", *compile_s)
        console.print(speed)
    if result.tasks:
        scores = Table(title="lm-eval tasks")
        scores.add_column("task / metric")
        for m in args.models:
            scores.add_column(m, justify="right")
        first_model = next(iter(result.tasks.values()))
        for task, metrics in first_model.items():
            for metric in metrics:
                scores.add_row(f"{task} {metric}", *[f"{result.tasks[m][task][metric]:.4f}" for m in args.models])
        console.print(scores)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result.to_dict(), indent=2))
    return 0


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from moefy import api
    from moefy.export.llama_cpp import QUANTIZED
    from moefy.export.to_gguf import K_QUANT_BLOCK

    s = api.export_gguf(args.model, args.out, args.outtype, args.overwrite)
    experts = f", {s.experts} experts, top-{s.experts_used}" if s.experts else ""
    types = ", ".join(f"{n} {t.lower()}" for t, n in s.tensor_types.items())
    print(f"wrote {s.path}: llama.cpp arch {s.architecture}{experts}, {s.tensors} tensors ({types}), {s.outtype}, "
          f"{s.size_bytes / 2**20:.1f} MiB")
    if s.outtype in QUANTIZED and s.untiled_experts:
        widths = " and ".join(str(w) for w in s.untiled_experts)
        print(f"note: {sum(s.untiled_experts.values())} expert tensors are not K-quants: their rows ({widths} wide) "
              f"are not multiples of {K_QUANT_BLOCK}. llama.cpp runs such experts without its tiled MoE kernel, so "
              "the MoE's prompts may run slower than its dense model's; a hidden size and expert width that are "
              f"multiples of {K_QUANT_BLOCK} keep every expert a K-quant, and moefy build prints the flags that give "
              "such experts where the hidden size allows (docs/results.md, llama-cpp-shapes)")
    print(f"run it: llama-cli -m {s.path} -p 'Hello'   (Ollama: a Modelfile with 'FROM {s.path}', then ollama create)")
    return 0


def _cmd_fetch_converter(args: argparse.Namespace) -> int:
    from moefy.export import llama_cpp

    print(f"llama.cpp converter: {llama_cpp.fetch_converter()}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from moefy import api

    paths = api.analyze(args.model, args.data, args.out, args.seq_len, args.tokens_per_domain, args.overwrite)
    print(f"report: {paths['html']}  (summary {paths['markdown']}, numbers {paths['json']})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from moefy import api

    if args.resume is None and args.out is None:
        raise MoefyError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    final = api.train(args.moe_dir, args.data, args.recipe, args.resume or args.out, heldout=args.heldout,
                      resume=args.resume is not None, overwrite=args.overwrite, overrides=recipe_overrides(args))
    print(f"trained model: {final}  (metrics, loss.png and domain_weights.png in {final.parent})")
    return 0


COMMANDS = {"train": _cmd_train, "build": _cmd_build, "verify": _cmd_verify, "data": _cmd_data, "eval": _cmd_eval,
            "analyze": _cmd_analyze, "export-gguf": _cmd_export_gguf, "fetch-converter": _cmd_fetch_converter}


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except MoefyError as exc:
        print(f"moefy: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment, not a bug: a full disk, a permission, a vanished file
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"moefy: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moefy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
