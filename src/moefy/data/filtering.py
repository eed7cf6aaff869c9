"""`moefy data filter`: score every document for fluency and advertisement-likeness, drop by per-domain quantile
or absolute threshold, and write the kept corpus in its own format, the dropped records with their scores, and a
report. Nothing is lost: kept ∪ dropped = input (malformed records are dropped with their reason, and counted).

LLaMA-MoE removed ~15% of the disfluent and ~50% of the advertisement text from its CommonCrawl and C4 domains;
ad filtering at that level hurt downstream tasks, so every threshold is per score, and only named domains filter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from moefy.atomic import atomic_output, check_output
from moefy.data.records import FILTER_RECIPE, FILTER_SOURCE, KEPT_DIR, Record, read_records, write_records
from moefy.errors import MoefyError
from moefy.recipes import Frozen, dump_recipe

Score = Literal["fluency", "ads"]
DROPPED = "dropped.jsonl"
SCORES = "scores.jsonl"


# Drop the 15% least fluent documents of each filtered domain, and those the ad scorer puts above 0.5.
DEFAULT_CUTS = {"drop_quantile": {"fluency": 0.15}, "threshold": {"ads": 0.5}}


class FluencyOptions(Frozen):
    """Fluency: each document's perplexity under a reference LM, its opening only."""
    # None: as a training stage, the MoE's dense source model; standalone, the small SmolLM2-135M (fast, and fluency
    # ranks documents; it need not be the model being trained)
    model: str | None = Field(None, description="reference LM for perplexity (default smollm2-135m), or 'none' to "
                              "turn fluency scoring off", json_schema_extra={"flag": "--fluency", "metavar": "MODEL"})
    max_tokens: int = Field(256, ge=2, description="tokens scored per document (its opening)")
    batch_size: int = Field(8, ge=1, description="documents per forward")
    cache: str | None = Field(None, description="fluency score cache file, resumable (default "
                              "<MOEFY_CACHE>/fluency-scores.jsonl)", json_schema_extra={"flag": "--cache"})


class AdsOptions(Frozen):
    """Advertisement-likeness: a keyword heuristic or a fastText classifier."""
    scorer: str = Field("heuristic", description="'heuristic', a classifier dir from `moefy data "
                        "train-classifier`, or 'none'", json_schema_extra={"flag": "--ads", "metavar": "SCORER"})


# The field of each scorer's section whose value 'none' turns that scorer off (`--fluency none`, `--ads none`).
SWITCHES = {"fluency": "model", "ads": "scorer"}


class FilterRecipe(Frozen):
    fluency: FluencyOptions | None = FluencyOptions()
    ads: AdsOptions | None = AdsOptions()
    domains: list[str] | None = Field(None, description="domains to filter (default: all); the others pass through")
    # LLaMA-MoE dropped fluency 0.15 and ads 0.5 by quantile; unset cut-offs take DEFAULT_CUTS
    drop_quantile: dict[Score, float] = Field(description="per domain, drop this top fraction by score, e.g. "
                                              "fluency=0.15,ads=0.5")
    threshold: dict[Score, float] = Field(description="drop every document scoring above this, e.g. ads=0.5 "
                                          "(ads: probability or heuristic score)")
    text_field: str = Field("text", description="the records' text field")
    domain_field: str = Field("domain", description="the records' domain field")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        """Scorers switched off become None; unset cut-offs default to DEFAULT_CUTS for the scorers that are on."""
        if isinstance(data, dict):
            data = dict(data)
            for score, switch in SWITCHES.items():
                value = data.get(score)
                if value in ("none", False) or isinstance(value, dict) and value.get(switch) == "none":
                    data[score] = None
            on = {s for s in SWITCHES if data.get(s, "default") is not None}
            for key, defaults in DEFAULT_CUTS.items():
                if data.get(key) is None:
                    data[key] = {s: v for s, v in defaults.items() if s in on}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "FilterRecipe":
        for score, q in self.drop_quantile.items():
            if not 0 <= q < 1:
                raise ValueError(f"drop_quantile for {score} must be in [0, 1) (got {q})")
        for score in {*self.drop_quantile, *self.threshold}:
            if getattr(self, score) is None:
                raise ValueError(f"a {score} threshold is set but the {score} scorer is off")
        if self.fluency is None and self.ads is None:
            raise ValueError("nothing to filter by: both scorers are off")
        return self


def decide(records: list[Record], scores: dict[str, list[float | None]], recipe: FilterRecipe) -> list[list[str]]:
    """Per record, the reasons it is dropped ([] = kept). Quantiles drop exactly round(q·n) documents of each named
    domain, highest scores first, ties by position: deterministic and exact."""
    reasons: list[list[str]] = [[f"malformed: {r.problem}"] if r.text is None else [] for r in records]
    named = set(recipe.domains) if recipe.domains is not None else None
    for score, values in scores.items():
        by_domain: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            if r.text is not None and (named is None or r.domain in named):
                by_domain.setdefault(r.domain, []).append(i)
        q = recipe.drop_quantile.get(score)
        limit = recipe.threshold.get(score)
        for members in by_domain.values():
            if q:
                ranked = sorted(members, key=lambda i: (-values[i], i))
                for i in ranked[:round(q * len(members))]:
                    reasons[i].append(f"{score} in top {q:g} of {records[i].domain}")
            if limit is not None:
                for i in members:
                    if values[i] > limit:
                        reasons[i].append(f"{score} > {limit:g}")
    return reasons


SMALL_SCORER = "smollm2-135m"


def filter_corpus(corpus: Path, recipe: FilterRecipe, out: Path, overwrite: bool = False,
                  default_model: str = SMALL_SCORER) -> dict:
    """Run the filter; returns the summary written to report/report.json. `default_model` scores fluency when the
    recipe names no model."""
    from moefy.data.filter_report import write_report

    corpus, out = Path(corpus), Path(out)
    check_output(out, overwrite, inputs=(corpus,))
    records = read_records(corpus, recipe.text_field, recipe.domain_field)
    valid = [r for r in records if r.text is not None]
    if not valid:
        raise MoefyError(f"corpus {corpus} has no readable documents ({len(records)} malformed records)")
    if recipe.domains is not None:
        unknown = sorted(set(recipe.domains) - {r.domain for r in valid})
        if unknown:
            known = ", ".join(sorted({r.domain for r in valid}))
            raise MoefyError(f"unknown domain {unknown[0]!r} in --domains (the corpus has: {known})")
    if recipe.fluency is not None and recipe.fluency.model is None:
        recipe = recipe.model_copy(update={"fluency": recipe.fluency.model_copy(update={"model": default_model})})
    scores = score_records(records, recipe)
    reasons = decide(records, scores, recipe)
    with atomic_output(out, overwrite) as tmp:
        kept = [r for r, why in zip(records, reasons) if not why]
        write_records(kept, tmp / KEPT_DIR / (corpus.name if corpus.is_file() else ""), single_file=corpus.is_file())
        (tmp / KEPT_DIR).mkdir(exist_ok=True)
        with open(tmp / DROPPED, "w") as dropped, open(tmp / SCORES, "w") as all_scores:
            for i, (r, why) in enumerate(zip(records, reasons)):
                row = {"file": r.file, "index": r.index, "domain": r.domain,
                       "scores": {s: v[i] for s, v in scores.items()}}
                all_scores.write(json.dumps({**row, "kept": not why}) + "\n")
                if why:
                    dropped.write(json.dumps({**row, "reasons": why, "record": r.as_json()}) + "\n")
        dump_recipe(recipe, tmp / FILTER_RECIPE)
        (tmp / FILTER_SOURCE).write_text(json.dumps({"corpus": str(corpus.resolve()), "name": corpus.name}))
        summary = write_report(tmp / "report", records, scores, reasons, recipe)
    return summary


def score_records(records: list[Record], recipe: FilterRecipe) -> dict[str, list[float | None]]:
    from moefy.data.scoring.ads import ad_score
    from moefy.data.scoring.classifier import AdClassifier

    texts = [r.text for r in records if r.text is not None]
    index = [i for i, r in enumerate(records) if r.text is not None]
    # Load both scorers before scoring anything: a bad classifier fails in seconds, not after the fluency pass.
    ads = None if recipe.ads is None else (
        ad_score if recipe.ads.scorer == "heuristic" else AdClassifier(Path(recipe.ads.scorer)).score)
    fluency = None if recipe.fluency is None else fluency_scorer(recipe.fluency)
    out: dict[str, list[float | None]] = {}
    if fluency is not None:
        out["fluency"] = _spread(fluency.score(texts), index, len(records))
    if ads is not None:
        out["ads"] = _spread([ads(t) for t in texts], index, len(records))
    return out


def fluency_scorer(options: FluencyOptions):

    from moefy.data.scoring.fluency import FluencyScorer
    from moefy.models import load_causal_lm, load_tokenizer
    from moefy.sources import cache_dir, resolve_model

    source = resolve_model(options.model)
    cache = Path(options.cache) if options.cache else cache_dir() / "fluency-scores.jsonl"
    return FluencyScorer(load_causal_lm(source.directory), load_tokenizer(source.directory),
                         str(source.directory.resolve()), options.max_tokens, options.batch_size, cache)


def _spread(values: list[float], index: list[int], n: int) -> list[float | None]:
    out: list[float | None] = [None] * n
    for i, v in zip(index, values):
        out[i] = v if math.isfinite(v) else float("inf")
    return out
