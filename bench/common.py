"""What the quality benchmarks share: the demo corpus and SmolLM2, held-out perplexity per domain, a build, and a
training run from a list of stages."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import yaml

from moefy import api
from moefy.construct.recipe import BuildRecipe
from moefy.data.corpus import Corpus, load_corpus
from moefy.data.demo_corpus import build_demo_corpus
from moefy.models import load_causal_lm, load_tokenizer
from moefy.profile.perplexity import Perplexity, heldout_perplexity
from moefy.recipes import validate_recipe
from moefy.sources import resolve_model

MODEL = "smollm2-135m"
EVAL_TOKENS = 2048  # held-out tokens per domain
CALIB = {"tokens_per_domain": 4096}  # 16k calibration tokens over the 4 demo domains
SELF_TOKENS = 16384  # tokens per domain of text sampled from SmolLM2 itself (`moefy data generate --domains`)


@dataclass
class Bench:
    work: Path
    held: Corpus
    tokenizer: object
    dense: Perplexity

    @property
    def calib(self) -> str:
        return str(self.work / "corpus" / "calib")

    @property
    def unseen(self) -> Corpus:
        """The demo corpus's `unseen/` split: text construction never sees (the installed packages' READMEs)."""
        return load_corpus(self.work / "corpus" / "unseen")

    def evaluate(self, model_dir: Path) -> Perplexity:
        return heldout_perplexity(load_causal_lm(model_dir), self.tokenizer, self.held, seq_len=256,
                                  tokens_per_domain=EVAL_TOKENS)

    def build(self, name: str, **fields) -> Path:
        recipe = validate_recipe(BuildRecipe, {"model": MODEL, "calib": self.calib, "profile": CALIB, **fields})
        api.build(recipe, self.work / name, overwrite=True)
        return self.work / name

    def train(self, moe: Path, name: str, recipe: dict, data: str | None = None) -> Path:
        """A training run of `recipe` from `moe` on `data` (default: the demo calibration)."""
        path = self.work / f"recipe-{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return api.train(moe, data or self.calib, path, self.work / f"run-{name}", overwrite=True)

    def gap_recovered(self, before: Perplexity, after: Perplexity, domain: str | None = None) -> float:
        """1 − log(after/dense) ÷ log(before/dense): the share of the log-perplexity gap that training closed."""
        dense = math.log(self.dense.ppl(domain))
        return 1 - (math.log(after.ppl(domain)) - dense) / (math.log(before.ppl(domain)) - dense)


def cpu_name() -> str:
    """The CPU's model name, for a timing table's header: ratios from two machines compare only loosely."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def saved_rows(path: Path) -> tuple[dict, str]:
    """The rows and CPU name a timing bench saved as {cpu, rows}, for --docs-only; a file from before the benches
    wrote the CPU also lacks their prefill column, so it is refused rather than half-rendered."""
    saved = json.loads(path.read_text())
    if not {"cpu", "rows"} <= saved.keys():
        raise SystemExit(f"{path} predates the CPU and prefill fields the docs table needs: rerun the bench")
    return saved["rows"], saved["cpu"]


def unseen_perplexity(model, tokenizer, unseen: Corpus) -> float:
    """Perplexity of a loaded model on the unseen corpus (8192 tokens of it, context 256)."""
    return heldout_perplexity(model, tokenizer, unseen, seq_len=256, tokens_per_domain=4 * EVAL_TOKENS).ppl()


def demo_corpus(work: Path) -> Path:
    """The demo corpus under `work`, written once: it is deterministic, so a rerun reuses it (one from before the
    `unseen/` split is rewritten)."""
    if not (work / "corpus" / "unseen").is_dir():
        build_demo_corpus(work / "corpus", overwrite=(work / "corpus").is_dir())
    return work / "corpus"


def setup(work: Path) -> Bench:
    """The demo corpus under `work` (demo_corpus), SmolLM2 and its dense held-out perplexity."""
    demo_corpus(work)
    source = resolve_model(MODEL)
    tok = load_tokenizer(source.directory)
    held = load_corpus(work / "corpus" / "heldout")
    bench = Bench(work, held, tok, None)
    bench.dense = bench.evaluate(source.directory)
    return bench


def with_self(calib: Path, out: Path, domains: int) -> Path:
    """The demo calibration files and `domains` × SELF_TOKENS tokens sampled from the dense model, in one
    directory."""
    out.mkdir()
    for f in calib.iterdir():
        (out / f.name).symlink_to(f.resolve())
    api.generate_calibration(MODEL, out / "self.jsonl", domains * SELF_TOKENS, seed=0, domains=domains)
    return out


def dense_row(dense: Perplexity, label: str = "dense (absolute ppl)", lead: int = 0, extra: tuple = ()) -> str:
    """The table row of absolute dense perplexities: `lead` empty cells, the domains, overall, then `extra` cells."""
    cells = [""] * lead + [f"{dense.ppl(d):.2f}" for d in dense.per_domain] + [f"{dense.ppl():.2f}", *extra]
    return f"| {label} | " + " | ".join(cells) + " |"


def ratio_cells(ppl: Perplexity, dense: Perplexity) -> list[str]:
    return [f"×{ppl.ppl(d) / dense.ppl(d):.3g}" for d in dense.per_domain] + [f"**×{ppl.ppl() / dense.ppl():.3g}**"]


def carve_layers(fields: dict, every: int = 1):
    """Yield (layer index, LayerInput, Split, recipe) for SmolLM2 with a carve recipe of `fields` (today's defaults
    otherwise): the partition a build makes, from the demo calibration's statistics (profiled once, then cached)."""
    import tempfile

    from moefy.construct.layer import LayerInput
    from moefy.construct.registry import METHODS, layer_rng, resolve_defaults
    from moefy.families import family_for
    from moefy.profile.options import ProfileOptions
    from moefy.profile.runner import profile_cached
    from moefy.tensor_io import LazyCheckpoint
    source = resolve_model(MODEL)
    config, family = source.config(), family_for(source.config())
    with tempfile.TemporaryDirectory(prefix="moefy-carve-layers-") as work:
        build_demo_corpus(Path(work) / "corpus")
        stats = profile_cached(source, family, load_corpus(Path(work) / "corpus" / "calib"), ProfileOptions(**CALIB), 0)
    reader = LazyCheckpoint(source.directory)
    recipe = resolve_defaults(BuildRecipe(model=MODEL, method="carve", **fields))
    for i in range(0, int(config["num_hidden_layers"]), every):
        layer = LayerInput(i, int(config["intermediate_size"]), int(config["hidden_size"]),
                           lambda w, i=i: reader.get(family.ffn_key(i, w)), lambda: stats)
        yield i, layer, METHODS["carve"](layer, recipe, layer_rng(recipe.seed, i, "method")), recipe

