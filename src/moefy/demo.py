"""`make demo`: the main job on the embedded defaults. Build the demo corpus, sample calibration text from the dense
model beside it, turn SmolLM2-135M into an MoE with the pipeline we recommend from what we measured (carve: shared
1/8 + 4 of 28 routed experts = 25% of FFN active, routers fitted on the calibration split, then layer-wise
reconstruction of the experts), verify exactness and show the oracles, compare perplexity against the dense model on
each held-out domain and on text of no calibration domain, run a short recovery stage (LoRA on the experts + routers
+ norms, on the calibration split), and write the routing analysis report.

Usage: python -m moefy.demo [--out DIR]. The demo only ever replaces directories that a previous run wrote (it marks
--out when it starts, so a run stopped half-way can be rerun); anything else at --out is refused, as with
`moefy build`."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from statistics import mean

from rich.console import Console
from rich.table import Table

from moefy import api
from moefy.construct.recipe import BuildRecipe, ReconstructOptions
from moefy.data.corpus import load_corpus
from moefy.data.demo_corpus import build_demo_corpus
from moefy.data.generate import SELF_DOMAIN, domain_names
from moefy.data.records import read_records
from moefy.errors import MoefyError
from moefy.export.card import params_summary
from moefy.models import load_causal_lm, load_tokenizer
from moefy.profile.perplexity import Perplexity, heldout_perplexity
from moefy.recipes import BUILD_RECIPE, dump_recipe
from moefy.sources import resolve_model
from moefy.train.recipe import Lora, Stage, TrainRecipe

EVAL_TOKENS_PER_DOMAIN = 2048
UNSEEN_TOKENS = 8192  # the package READMEs are one domain: four held-out domains' worth, as in bench_reconstruct
MARKER = ".moefy-demo"  # what tells a directory the demo wrote from a user's
# Text the dense model samples itself, as four more calibration domains of 16k tokens (each gets the per-domain
# budget): at this split after reconstruction, unseen text ×4.61 dense with one such domain, ×4.15 with two, ×3.77
# with four, for held-out ×1.66, ×1.70, ×1.69 (docs/results.md, reconstruction-self); 3 more minutes of profiling
# and reconstruction on a laptop CPU, plus the sampling: on the slower 2-core CPU 9:53 in batches of 32 texts and
# 6:52 in batches of SAMPLE_BATCH (the matmuls of 128 rows run nearer the CPU's peak; the KV cache of 128 × 258
# positions is 0.2 GB for SmolLM2). The recovery stage trains on the same calib/, so it adapts less to the demo
# domains too (held-out after recovery ×1.39 → ×1.49, unseen ×3.51 → ×2.97; README).
SAMPLED_TOKENS = 65_536
SAMPLED_DOMAINS = 4
SAMPLE_BATCH = 128
# A short recovery stage: LoRA on the experts, with routers and norms (docs/results.md: the set that recovers most
# at 25% active), on LM loss: after reconstruction, 30k tokens of LM loss reached ×1.31 dense, distillation from
# the dense model ×1.54 and KL + LM ×1.36 (the best on unseen text, ×3.74 against ×3.88), both at 70% of the speed
# (docs/results.md). carve's fitted routers are tiny (RMS ~5e-4), so they step by 1% of their own size, not by lr.
DEMO_TRAIN = TrainRecipe(stages=[Stage(name="recovery", trainable="experts-lora", tokens=24_576, seq_len=256,
                                       batch_size=4, lr=1e-3, router_lr_ratio=0.01, warmup_steps=2,
                                       lora=Lora(rank=16, alpha=32))], checkpoint_every=1000)


def run(out: Path) -> int:

    console = Console()
    corpus_dir, moe_dir, report_dir, run_dir = out / "corpus", out / "moe", out / "report", out / "train"
    # a demo output from before the marker is known by its build recipe
    ours = (out / MARKER).is_file() or (moe_dir / BUILD_RECIPE).is_file()
    if out.exists() and not ours and any(out.iterdir()):
        raise MoefyError(f"{out} exists and was not written by the demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    if not (corpus_dir / "unseen").is_dir():  # a corpus from before the unseen split is written again
        build_demo_corpus(corpus_dir, overwrite=corpus_dir.is_dir())
    # 28 experts of 48, top-4, from the measured granularity frontier (docs/results.md, "frontier"): 1.7× the prompt
    # speed of 56 × 24 top-8 in transformers (1.8-1.9× prefilled; faster than dense), a third as many near-tied routing
    # decisions, for ×1.75 instead of ×1.65 dense after reconstruction and ×1.42 instead of ×1.36 after the recovery
    # stage.
    recipe = BuildRecipe(model="smollm2-135m", experts=28, top_k=4, method="carve", calib=str(corpus_dir / "calib"),
                         reconstruct=ReconstructOptions(enabled=True))
    console.print(f"[bold]moefy demo[/]: {recipe.model} → carve, {recipe.experts} experts top-{recipe.top_k} "
                  f"+ shared block, reconstructed layer by layer, calibrated on {recipe.calib}")
    source = resolve_model(recipe.model)  # one-time GGUF dequantisation into the cache, kept out of the build time
    sampled = corpus_dir / "calib" / f"{SELF_DOMAIN}.jsonl"
    t0 = time.perf_counter()
    # as `moefy data generate smollm2-135m --out calib/self.jsonl --tokens 65536 --domains 4 --batch-size 128`; a
    # file from an earlier demo with other settings is sampled again (the directory is the demo's own)
    if (not sampled.is_file() or load_corpus(sampled).domains() != domain_names(SELF_DOMAIN, SAMPLED_DOMAINS)
            or _sampled_with(sampled).get("batch_size") != SAMPLE_BATCH):
        api.generate_calibration(recipe.model, sampled, SAMPLED_TOKENS, seed=0, domains=SAMPLED_DOMAINS,
                                 batch_size=SAMPLE_BATCH, overwrite=True)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = api.build(recipe, moe_dir, overwrite=(moe_dir / BUILD_RECIPE).is_file())
    t_build = time.perf_counter() - t0
    report = api.verify(moe_dir, recipe.model)
    tok = load_tokenizer(source.directory)
    held, unseen = load_corpus(corpus_dir / "heldout"), load_corpus(corpus_dir / "unseen")

    def evaluate(directory: Path) -> tuple[Perplexity, float]:
        model = load_causal_lm(directory)
        return (heldout_perplexity(model, tok, held, tokens_per_domain=EVAL_TOKENS_PER_DOMAIN),
                heldout_perplexity(model, tok, unseen, tokens_per_domain=UNSEEN_TOKENS).ppl())

    dense, dense_unseen = evaluate(source.directory)
    moe, moe_unseen = evaluate(moe_dir)

    m = result.plan.meta
    table = Table(title="moefy demo summary", show_header=False)
    for k, v in [
        ("output", f"{moe_dir} ({result.architecture}, loads with stock transformers)"),
        ("experts", f"{m.num_experts} × {m.expert_size} neurons, top-{m.top_k}, plus {m.shared_size} shared neurons"),
        ("params", params_summary(result.total_params, result.active_params, result.dense_params)),
        ("calibration", f"{recipe.calib}: the demo domains + {SAMPLED_TOKENS:,} tokens sampled from the model "
                        f"as {SAMPLED_DOMAINS} domains ({sampled.name}, {t_sample:.0f} s)"),
        ("build time (profiling and reconstruction included)", f"{t_build:.0f} s"),
        ("reconstruction: mean layer nMSE", f"{mean([f.before for f in result.reconstruction]):.3f} as built → "
                                            f"{mean([f.after for f in result.reconstruction]):.3f}"),
        (f"exactness ({report.check})", f"max |Δlogits| = {report.max_abs_dlogits:.1e} → "
                                        f"{'PASS' if report.passed else 'FAIL'}"),
        ("probe perplexity ÷ dense", f"MoE ×{report.built_moe_ppl / report.dense_ppl:.2f}; expert oracle "
                                     f"×{report.expert_oracle_ppl / report.dense_ppl:.2f}; neuron oracle at "
                                     f"{report.active_fraction:.0%} ×{report.neuron_oracle_ppl / report.dense_ppl:.2f}"),
    ]:
        table.add_row(k, v)
    console.print(table)
    dump_recipe(DEMO_TRAIN, out / "train.yaml")
    final = api.train(moe_dir, str(corpus_dir / "calib"), out / "train.yaml", run_dir, overwrite=run_dir.is_dir())
    trained, trained_unseen = evaluate(final)
    ppl = Table(title=f"perplexity (context {dense.seq_len}): held-out demo domains, and text of no calibration "
                      f"domain ({UNSEEN_TOKENS:,} tokens of the installed packages' READMEs)")
    for col in ("domain", "dense", "MoE reconstructed (no training)", "MoE after recovery", "gap recovered"):
        ppl.add_column(col, justify="right")
    rows = [(d, dense.ppl(d), moe.ppl(d), trained.ppl(d)) for d in dense.per_domain]
    rows += [("held-out overall", dense.ppl(), moe.ppl(), trained.ppl()),
             ("unseen (package READMEs)", dense_unseen, moe_unseen, trained_unseen)]
    for name, base, before, after in rows:
        # fraction of the log-perplexity gap to dense closed by the recovery stage
        closed = (math.log(before) - math.log(after)) / max(math.log(before) - math.log(base), 1e-9)
        ppl.add_row(name, f"{base:.2f}", f"{before:.2f} (×{before / base:.2f})",
                    f"{after:.2f} (×{after / base:.2f})", f"{closed:.0%}", end_section=name == "held-out overall")
    console.print(ppl)
    paths = api.analyze(str(final), str(corpus_dir / "heldout"), report_dir, overwrite=report_dir.is_dir())
    console.print(f"routing report: [bold]{paths['html']}[/] (summary {paths['markdown']}); "
                  f"training curves: {run_dir / 'loss.png'}")
    return 0 if report.passed else 1


def _sampled_with(path: Path) -> dict:
    """The settings a sampled calibration file records in its first record ({} where it records none)."""
    first = read_records(path)[0].as_json()
    return first.get("generated", {}) if isinstance(first, dict) else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moefy.demo")
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    args = parser.parse_args(argv)
    try:
        return run(args.out)
    except MoefyError as exc:
        print(f"moefy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
