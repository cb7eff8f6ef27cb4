"""Reading a recipe: YAML, dotted ``key=value`` overrides, plugin loading and validation (the
one-line messages come from :mod:`zenalign.recipe.messages`); and the same recipe built from the
Python API's keyword arguments."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError

from zenalign.data import read_utf8
from zenalign.errors import RecipeError, one_line
from zenalign.plugins import PluginRegistry, collect_registry, load_plugins
from zenalign.recipe.messages import format_validation_error
from zenalign.recipe.schema import Recipe, build_recipe_model
from zenalign.recipe.trl import translate_trl_options


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
        text = read_utf8(path, RecipeError)
    except OSError as exc:
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


def merge_section(node: dict[str, Any], key: str, value: Any) -> None:
    """``node[key] = value``, except that a mapping given for a section that holds one is merged
    into it, key by key (``run={overwrite: true}`` keeps the section's other fields). A plugin
    section given another ``type`` is replaced: the old type's options would not apply."""
    old = node.get(key)
    if not (isinstance(value, dict) and isinstance(old, dict)) or ("type" in value and value["type"] != old.get("type")):
        node[key] = copy.deepcopy(value)
        return
    for name, item in value.items():
        merge_section(old, name, item)


def leaf_paths(prefix: tuple[str, ...], value: Any) -> dict[tuple[str, ...], Any]:
    """The fields a value sets: ``("run",), {"steps": 3}`` -> ``{("run", "steps"): 3}``."""
    if isinstance(value, dict) and value:
        found: dict[tuple[str, ...], Any] = {}
        for name, item in value.items():
            found.update(leaf_paths((*prefix, str(name)), item))
        return found
    return {prefix: value}


def check_conflicts(sources: dict[tuple[str, ...], tuple[str, Any, tuple[str, ...]]], origin: str, value: Any,
                    prefix: tuple[str, ...]) -> None:
    """Refuse a field set to two different values by two options written differently (a dotted
    key and a section mapping, or two mappings), naming both. The very same key given again
    (``run.steps=10 ... run.steps=12``) is a plain override: the last one wins."""
    for path, item in leaf_paths(prefix, value).items():
        seen = sources.get(path)
        if seen is not None and seen[1] != item and not (seen[2] == prefix == path):
            raise RecipeError(f"{seen[0]} and {origin} both set {'.'.join(path)} ({seen[1]!r} vs {item!r}); give it once")
        sources[path] = (origin, item, prefix)


def apply_override(data: dict[str, Any], text: str,
                   sources: dict[tuple[str, ...], tuple[str, Any, tuple[str, ...]]] | None = None) -> None:
    keys, value = parse_override(text)
    if sources is not None:
        check_conflicts(sources, f"override '{text}'", value, tuple(keys))
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, text, create=True)
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, text)] = value
    elif isinstance(node, dict):
        merge_section(node, last, value)
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
    sources: dict[tuple[str, ...], tuple[str, Any, tuple[str, ...]]] = {}
    for text in overrides:
        apply_override(data, text, sources)
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
    check_group_size(recipe, registry, source, overrides)
    return LoadedRecipe(recipe, source, base_dir, name, list(overrides), registry)


def check_group_size(recipe: Recipe, registry: PluginRegistry, source: str, overrides: Sequence[str]) -> None:
    """``sampling.group_size`` is at least what the chosen normalizer needs (2 for group-relative ones)."""
    normalizer = getattr(recipe.normalizer, "type", None)
    need = getattr(registry.types.get("normalizer", {}).get(normalizer), "min_group_size", 2)
    size = recipe.sampling.group_size
    if size >= need:
        return
    origin = next((f"override '{t}'" for t in overrides if t.partition("=")[0].strip() in ("sampling.group_size", "sampling")),
                  source)
    single = [n for n, t in registry.types.get("normalizer", {}).items() if getattr(t, "min_group_size", 2) <= size]
    raise RecipeError(f"{origin}: sampling.group_size: must be >= {need} (got {size}); normalizer '{normalizer}' compares "
                      f"completions within a group. For one completion per prompt use a normalizer that needs no group "
                      f"(installed: {', '.join(sorted(single)) or 'none'})")


# Recipe sections whose fields GRPOTrainer accepts as plain keyword arguments.
FLAT_SECTIONS = ("model", "sampling", "grpo", "engine", "run")


def recipe_from_options(options: dict[str, Any], name: str) -> LoadedRecipe:
    """Build a recipe from keyword arguments: section names (``grpo={...}``) or any field of
    model/sampling/grpo/engine/run by its own name (``group_size=12``)."""
    owner = {field: section for section in FLAT_SECTIONS for field in Recipe.model_fields[section].annotation.model_fields}
    options = translate_trl_options(options)
    data: dict[str, Any] = {}
    sources: dict[tuple[str, ...], tuple[str, Any, tuple[str, ...]]] = {}
    for key, value in options.items():
        if key in Recipe.model_fields:  # a section: merged with flat fields given for it, in any order
            check_conflicts(sources, f"{key}={value!r}", value, (key,))
            merge_section(data, key, value)
        elif key in owner:
            check_conflicts(sources, f"{key}={value!r}", value, (owner[key], key))
            merge_section(data.setdefault(owner[key], {}), key, value)
        else:
            raise RecipeError(
                f"GRPOTrainer: unknown option '{key}'; options are recipe sections ({', '.join(Recipe.model_fields)}) "
                f"or fields of {', '.join(FLAT_SECTIONS)} such as group_size, clip_epsilon, kl_coef, learning_rate, steps"
            )
    return validate_recipe(data, source="GRPOTrainer(...)", base_dir=Path.cwd(), name=name)
