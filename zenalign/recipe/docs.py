"""The recipe reference (docs/recipe-reference.md), generated from the schema and the installed
plugin types, so the documentation cannot drift from the code."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from zenalign.plugins import KINDS
from zenalign.plugins import PluginRegistry
from zenalign.recipe.schema import ENTRY_BASES, Recipe

SECTIONS = ("model", "data", "sampling", "grpo", "rewards", "objectives", "filters", "normalizer", "loss", "environment",
            "engine", "run", "plugins", "sweep")
PLUGIN_SECTIONS = {"data": "task", "rewards": "reward", "filters": "filter", "normalizer": "normalizer", "loss": "loss",
                   "environment": "environment"}


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
        return "`[]`" if value == [] else "`{}`" if value == {} else "(see section)"
    if field.default is PydanticUndefined:
        return "**required**"
    value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`"


def field_table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        kind = type_name(field.annotation).replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {default_text(field)} | {desc} |")
    return lines


def _model_of(annotation: Any):
    """The section model inside X, Optional[X] or dict[str, X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def nested_tables(section: str, model: type[BaseModel]) -> list[str]:
    """A table for each field of ``model`` that is itself a section (``model.lora``, ``sampling.vllm``)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        if inner is not None and typing.get_origin(field.annotation) is not dict:
            out += [f"### `{section}.{name}`", "", " ".join((inner.__doc__ or "").split()), ""] + field_table(inner) + [""]
    return out


def recipe_reference(registry: PluginRegistry) -> str:
    out = [
        "# Recipe reference",
        "",
        "Generated from the schema by `zenalign schema --format markdown`; a test checks it is current.",
        "Unknown keys are errors everywhere. Any field can be overridden on the command line:",
        "`zenalign run RECIPE section.field=value` (list entries by index: `rewards.0.weight=2`).",
        "",
    ]
    for section in SECTIONS:
        field = Recipe.model_fields[section]
        out += [f"## `{section}`", "", field.description or "", ""]
        annotation = field.annotation
        if section in PLUGIN_SECTIONS:
            kind = PLUGIN_SECTIONS[section]
            common = ENTRY_BASES[kind]
            if common.model_fields:
                out += ["Fields every entry has:", ""] + field_table(common) + [""]
            default = registry.default(kind)
            for name in registry.names(kind):
                ptype = registry.types[kind][name]
                mark = " (default)" if name == default else ""
                out += [f"### {KINDS[kind][2]} `{name}`{mark}", "", ptype.summary(), ""]
                if ptype.options.model_fields:
                    out += field_table(ptype.options) + [""]
                else:
                    out += ["No options.", ""]
        elif _model_of(annotation) is not None:
            model = _model_of(annotation)
            if typing.get_origin(annotation) is dict:
                out += ["A mapping from name to:", ""]
            out += field_table(model) + [""] + nested_tables(section, model)
        else:
            out += [f"Type: {type_name(annotation)}; default: {default_text(field)}.", ""]
    return "\n".join(out).rstrip() + "\n"


def trl_table() -> str:
    """docs/from-trl.md's table of every field of TRL's GRPOConfig, by group, from
    :data:`~zenalign.recipe.trl_fields.GROUPS` (``zenalign schema --format trl``)."""
    from zenalign.recipe.trl_fields import ANY, GROUPS

    lines = []
    for group, fields in GROUPS.items():
        lines += [f"### {group}", "", "| TRL | zenalign | notes |", "|---|---|---|"]
        for name, field in fields.items():
            legacy = f" (from {field.legacy})" if field.legacy else ""
            if field.target:
                lines.append(f"| `{name}`{legacy} | `{field.target}` | {field.note} |")
                continue
            quiet = [a for a in field.accepts if a is not None]
            also = ("; any value is accepted, with no effect" if ANY in quiet else
                    f"; {', '.join(f'`{a!r}`' for a in quiet)} accepted, with no effect" if quiet else "")
            lines.append(f"| `{name}`{legacy} | no equivalent | because {field.note}{also} |")
        lines.append("")
    return "\n".join(lines)
