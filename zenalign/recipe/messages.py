"""Turning pydantic's validation errors into one line that names the file or override, the
field, what is wrong and what is accepted."""

from __future__ import annotations

import types
import typing
from typing import Any, Iterable, Optional

from pydantic import BaseModel, ValidationError

from zenalign.errors import one_line


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], source: str, overrides: Iterable[str] = (),
    renamed: Optional[dict[str, str]] = None,
) -> str:
    """One line: ``where: field: what is wrong; what is accepted`` for each problem. ``renamed``: the
    fields older keys set (``grpo.clip_epsilon`` -> ``loss.clip_epsilon``), so an override by an old
    key is blamed for its field's problem."""
    renamed = renamed or {}
    override_keys = {renamed.get(key, key): text for key, text in ((t.partition("=")[0].strip(), t) for t in overrides)}
    parts = []
    for err in exc.errors():
        shown, _ = _walk(model, tuple(err["loc"]))
        display = _render(shown)
        origin = source
        for key, text in override_keys.items():
            if display == key or display.startswith(key + ".") or key.startswith(display + "."):
                origin = f"override '{_cut(text)}'"
        parts.append(f"{origin}: {display or '(recipe)'}: {_describe(err, model)}")
    return "; ".join(parts)


def _render(items: list) -> str:
    """["rewards", 0, "pattern"] -> "rewards[0].pattern"."""
    text = ""
    for item in items:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else str(item))
    return text


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list, Any]:
    """Follow pydantic's error location through the recipe's models.

    Returns the location without the union tags pydantic inserts for plugin entries (so users
    see ``rewards[0].pattern``, not ``rewards.0.regex_match.pattern``) and the model class found
    at its end (or None)."""
    shown: list = []
    current: Any = model
    for item in loc:
        if isinstance(current, list):  # a union of entry models: this item is the type tag
            current = next((m for m in current if _tag_of(m) == item), None)
            continue
        shown.append(item)
        if isinstance(current, tuple):  # ("list", element)
            current = current[1]
        elif isinstance(current, type) and issubclass(current, BaseModel):
            f = current.model_fields.get(item) if isinstance(item, str) else None
            current = _unwrap(f.annotation) if f else None
        else:
            current = None
    return shown, current


def _tag_of(entry_model: type[BaseModel]) -> Any:
    return typing.get_args(entry_model.model_fields["type"].annotation)[0]


def _unwrap(annotation: Any) -> Any:
    """Reduce an annotation to a model class, a list of union members, ("list", element), or None."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _unwrap(args[0])
    if origin in (typing.Union, types.UnionType):
        members = [_unwrap(a) for a in args if a is not type(None)]
        if len(members) == 1:
            return members[0]
        if all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
            return members
        return None
    if origin is list:
        return ("list", _unwrap(args[0]) if args else None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _cut(text: str) -> str:
    """Text shown in an error, cut short: a 5,000-character value would make a 5,000-character line."""
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def _shown(value: Any) -> str:
    """``repr(value)``, cut short."""
    text = repr(value)
    if len(text) <= 80:
        return text
    return f"{value[:60]!r}... ({len(value):,} characters)" if isinstance(value, str) else _cut(text)


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_EXPECTED = {
    "int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "finite_number": "a finite number",
    "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
    "model_type": "a mapping of fields", "model_attributes_type": "a mapping of fields", "dict_type": "a mapping",
}


def _describe(err: dict, model: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        _, parent = _walk(model, tuple(err["loc"])[:-1])
        if isinstance(parent, type) and issubclass(parent, BaseModel):
            names = sorted(parent.model_fields, key=lambda n: n != "type")  # `type` first, then as declared
            return f"unknown field; accepted here: {', '.join(names)}"
        return "unknown field; see `zenalign schema` for what is accepted"
    if kind == "union_tag_invalid":
        expected = str(ctx.get("expected_tags", "")).replace("'", "")
        return f"unknown type '{_cut(str(ctx.get('tag')))}'; installed types: {expected}"
    if kind == "union_tag_not_found":
        return "missing 'type'; name the plugin type of this entry (see `zenalign plugins`)"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {_shown(value)})"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        return f"must be {_BOUNDS[kind]} {bound} (got {_shown(value)})"
    if kind == "too_short":
        need = ctx.get("min_length", 1)
        return f"needs at least {need} {'entry' if need == 1 else 'entries'} (got {ctx.get('actual_length', 0)})"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]} (got {_shown(value)})"
    if kind == "value_error":
        shown = "" if isinstance(value, dict) else f" (got {_shown(value)})"  # a whole section says nothing more
        return one_line(err["msg"]).removeprefix("Value error, ") + shown
    return f"{one_line(err['msg'])} (got {_shown(value)})"
