"""Command-line flags generated from a recipe's fields (mergekit's add_merge_options is the model): every field of
the recipe and of its sections becomes a flag whose type, choices, default and help come from the pydantic field,
so a new recipe field is a new flag with nothing else to edit. A flag given overrides that field of the YAML recipe;
a flag not given overrides nothing. Sections (optional ones too) become help groups; a field may name a shorter flag
in its json_schema_extra (`--seq-len` for profile.seq_len). A list field takes a comma list (`--domains a,b`), a
dict field KEY=NUMBER pairs (`--drop-quantile fluency=0.15,ads=0.5`). A section that is off by default (`distill:
None`) also gets a flag of its own name that turns it on with its defaults (`--distill`)."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

PREFIX = "recipe:"  # argparse dest of a generated flag: recipe:section.field
SECTION_ON = object()  # the value of a flag that turns an off-by-default section on


def add_recipe_flags(parser: argparse.ArgumentParser, recipe: type[BaseModel], skip: tuple[str, ...] = (),
                     under: tuple[str, ...] = ()) -> None:
    """under: where the fields sit in the overrides, left out of the flag names (train's stage flags are `--lr`,
    not `--stage-lr`, and arrive under "stage" for the caller to apply to every stage)."""
    _add(parser, recipe, (), skip, under)


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as a nested dict of recipe fields (for recipes.load_recipe)."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(PREFIX) and value is not None:
            *sections, name = dest[len(PREFIX):].split(".")
            node = out
            for s in sections:
                node = node.setdefault(s, {})
            if value is SECTION_ON:  # on with its defaults, unless its own flags (in node[name]) set more
                node.setdefault(name, {})
            else:
                node[name] = value
    return out


def _add(parser, model: type[BaseModel], path: tuple[str, ...], skip: tuple[str, ...],
         under: tuple[str, ...]) -> None:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        here = (*path, name)
        dest = PREFIX + ".".join((*under, *here))
        flag = "--" + "-".join(here).replace("_", "-")
        section = _section(field.annotation)
        if section is not None:  # a section: its own help group
            summary = " ".join((section.__doc__ or "").split()).split(". ")[0]  # the docstring's first sentence
            group = parser.add_argument_group(f"{name} options", summary.rstrip(".") + "." if summary else None)
            if field.get_default() is None and not field.is_required():
                group.add_argument(flag, dest=dest, action="store_const", const=SECTION_ON, default=None,
                                   help=f"turn {name} on (default off): {field.description or summary}")
            _add(group, section, here, (), under)
            continue
        kind, choices = _flag_type(field.annotation)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = extra.get("flag", flag)
        default = field.get_default()
        text = field.description or ""
        if kind is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{text} (default {'on' if default else 'off'})")
            continue
        shown = f" (default {default})" if default is not None and not field.is_required() else ""
        metavar = extra.get("metavar", METAVARS.get(kind, name.upper()))
        parser.add_argument(flag, dest=dest, type=kind, choices=choices, default=None,
                            metavar=None if choices else metavar, help=text + shown)


def _section(annotation) -> type[BaseModel] | None:
    """The section class of a field (`Options` or `Options | None`), or None for a plain field."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def number_pairs(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = float(value)  # no "=" leaves value empty, which float() refuses too
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes KEY=NUMBER pairs, e.g. fluency=0.15 (got {item!r})") from None
    return out


METAVARS = {comma_list: "A,B,...", number_pairs: "KEY=NUMBER,..."}


def _flag_type(annotation) -> tuple[type, list | None]:
    """(argparse type, choices) of a field: Optional is unwrapped, a Literal gives its choices, and a union of
    several types (layers: str | list[int]) is read as text, which the recipe's own validator parses."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _flag_type(inner[0]) if len(inner) == 1 else (str, None)
    if origin is Literal:
        return type(args[0]), list(args)
    if origin is list and args == (str,):
        return comma_list, None
    if origin is dict and args[1:] == (float,):
        return number_pairs, None
    return annotation, None
