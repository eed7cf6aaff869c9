"""What every recipe shares: frozen validated models, YAML in with command-line overrides merged section by
section, the resolved recipe out next to every result. Each recipe lives next to its stage: the build's in
construct/recipe.py (profiling's options in profile/options.py), training's in train/recipe.py, the data filter's
in data/filtering.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from moefy.errors import MoefyError

# The resolved recipe saved next to every output: a build's, and a training run's (in the run and its final model).
BUILD_RECIPE = "moefy.yaml"
TRAIN_RECIPE = "moefy_train.yaml"


UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB', '500MB', '1.5g', '123456' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in UNITS:
        raise ValueError(f"not a memory size: {text!r} (write it like 8GiB, 500MB or a number of bytes)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def _memory_size(text: str) -> str:
    parse_bytes(text)  # refused when the recipe is read, not when the pass starts
    return text


# A size as people write it ("8GiB"), kept as written in the saved recipe.
MemorySize = Annotated[str, AfterValidator(_memory_size)]


class Frozen(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number in any recipe field (--scale nan) is refused, not written out.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def load_recipe(model_cls: type[Frozen], path: Path | None, overrides: dict[str, Any]) -> Any:
    """Read a YAML recipe (if given), apply CLI overrides (None means 'not given'), validate."""
    return validate_recipe(model_cls, deep_merge(read_recipe(path) if path is not None else {}, overrides))


def read_recipe(path: Path) -> dict[str, Any]:
    """A YAML recipe's fields, unvalidated; a missing, undecodable or non-mapping file is a MoefyError."""
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
    return data


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
