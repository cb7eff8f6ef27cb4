"""Reading a recipe: YAML, dotted ``key=value`` overrides, plugin loading, validation, and
turning pydantic's errors into one line that names the file or override and the field."""

from __future__ import annotations

import copy
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from zenalign.errors import RecipeError, one_line
from zenalign.plugins import PluginRegistry, collect_registry, load_plugins
from zenalign.recipe import Recipe, build_recipe_model


class RecipeYAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false (any case) are booleans.

    YAML 1.1 also reads yes/no/on/off as booleans, which silently turns the constitution
    source's ``yes: " yes"`` into ``True: " yes"`` and ``y``/``n`` answers into bools."""


RecipeYAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=RecipeYAMLLoader)


@dataclass
class LoadedRecipe:
    """A validated recipe and where it came from."""

    recipe: Recipe
    source: str  # file name (or "<python>") used in error messages
    base_dir: Path  # relative paths in the recipe resolve against this
    name: str  # recipe name for `{recipe}` in run.output_dir
    overrides: list[str] = field(default_factory=list)
    registry: PluginRegistry | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.run.output_dir.replace("{recipe}", self.name))


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a recipe file into a mapping, with errors that give the line and column."""
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot be read: {one_line(exc)}") from exc
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: invalid YAML: {one_line(problem)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (model, data, sampling, ...), got a {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``grpo.kl_coef=0.02`` -> (["grpo", "kl_coef"], 0.02). The value is read as YAML, so
    numbers, booleans, null and ``[lists]`` work."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override '{text}': expected KEY.PATH=VALUE, for example grpo.kl_coef=0.02")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override '{text}': the value is not valid YAML: {one_line(exc)}") from exc
    return key.split("."), value


def apply_override(data: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, text, create=True)
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, text)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"override '{text}': '{'.'.join(keys[:-1])}' is not a section")


def _child(node: Any, key: str, text: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, text)]
    if not isinstance(node, dict):
        raise RecipeError(f"override '{text}': cannot descend into '{key}' (not a section)")
    if key not in node or node[key] is None:
        node[key] = {}
    return node[key]


def _index(node: list, key: str, text: str) -> int:
    try:
        i = int(key)
    except ValueError:
        raise RecipeError(f"override '{text}': '{key}' must be a list index (0..{len(node) - 1})") from None
    if not 0 <= i < len(node):
        raise RecipeError(f"override '{text}': index {i} is out of range; the list has {len(node)} entries")
    return i


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    data = read_yaml(path)
    return validate_recipe(
        data, source=str(path), base_dir=path.resolve().parent, name=path.stem, overrides=overrides
    )


def validate_recipe(
    data: dict[str, Any],
    source: str,
    base_dir: Path,
    name: str,
    overrides: Sequence[str] = (),
) -> LoadedRecipe:
    """Apply overrides, load the recipe's plugins, and validate against the installed types."""
    data = copy.deepcopy(data)
    for text in overrides:
        apply_override(data, text)
    plugin_specs = data.get("plugins") or []
    if not isinstance(plugin_specs, list) or not all(isinstance(s, str) for s in plugin_specs):
        raise RecipeError(f"{source}: plugins: expected a list of module names or .py paths")
    load_plugins(plugin_specs, base_dir)
    registry = collect_registry()
    model = build_recipe_model(registry)
    try:
        recipe = model.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, model, source, overrides)) from exc
    return LoadedRecipe(recipe, source, base_dir, name, list(overrides), registry)


# ----------------------------------------------------------------------------------------------
# Error formatting


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], source: str, overrides: Iterable[str] = ()
) -> str:
    """One line: ``where: field: what is wrong; what is accepted`` for each problem."""
    override_keys = {text.partition("=")[0].strip(): text for text in overrides}
    parts = []
    for err in exc.errors():
        shown, _ = _walk(model, tuple(err["loc"]))
        display = _render(shown)
        origin = source
        for key, text in override_keys.items():
            if display == key or display.startswith(key + ".") or key.startswith(display + "."):
                origin = f"override '{text}'"
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


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_EXPECTED = {
    "int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number",
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
        return f"unknown type '{ctx.get('tag')}'; installed types: {expected}"
    if kind == "union_tag_not_found":
        return "missing 'type'; name the plugin type of this entry (see `zenalign plugins`)"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {value!r})"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        return f"must be {_BOUNDS[kind]} {bound} (got {value!r})"
    if kind == "too_short":
        need = ctx.get("min_length", 1)
        return f"needs at least {need} {'entry' if need == 1 else 'entries'} (got {ctx.get('actual_length', 0)})"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]} (got {value!r})"
    if kind == "value_error":
        return one_line(err["msg"]).removeprefix("Value error, ") + f" (got {value!r})"
    return f"{one_line(err['msg'])} (got {value!r})"
