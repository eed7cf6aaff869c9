"""The Python API. Each CLI verb is a thin call into one function here."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from moefy.atomic import atomic_output, check_output
from moefy.construct.plan import MoEPlan
from moefy.construct.registry import make_plan, resolve_defaults
from moefy.data.corpus import load_corpus
from moefy.errors import MoefyError
from moefy.export.card import write_card
from moefy.export.checkpoint import write_checkpoint
from moefy.export.formats import choose_format
from moefy.export.verify import VerifyReport, verify
from moefy.families import family_for
from moefy.profile.runner import profile_cached
from moefy.recipes import BuildRecipe, dump_recipe
from moefy.sources import SIDE_FILES, resolve_model
from moefy.tensor_io import LazyCheckpoint

RECIPE_NAME = "moefy.yaml"

__all__ = ["BuildResult", "build", "verify", "VerifyReport"]


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
    stats = None
    if recipe.calib is not None:
        options = recipe.profile
        if recipe.method == "importance" and not options.taylor:
            options = options.model_copy(update={"taylor": True})  # the method is defined by the Taylor score
        stats = profile_cached(source, family, load_corpus(recipe.calib), options, recipe.seed)
    plan = make_plan(recipe, family, config, reader, stats)
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
        dump_recipe(recipe, tmp / RECIPE_NAME)
        architecture = model_config["architectures"][0]
        write_card(tmp, plan.meta, source.description, architecture, total, dense_params)
    return BuildResult(out, plan, architecture, total, plan.meta.active_params(total), dense_params)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
