"""Reading a recipe: YAML, dotted ``key=value`` overrides, plugin loading and validation (the
one-line messages come from :mod:`zenalign.recipe.messages`); and the same recipe built from the
Python API's keyword arguments."""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from pydantic import ValidationError

from zenalign.data import read_utf8
from zenalign.errors import RecipeError, one_line
from zenalign.plugins import PluginRegistry, collect_registry, load_plugins
from zenalign.recipe.messages import format_validation_error
from zenalign.recipe.schema import Recipe, build_recipe_model
from zenalign.recipe.trl import (FLAT_SECTIONS, RENAMED, Moved, Requirement, Setting, is_trl_name, renamed_settings,
                                 split_recipe, split_trl, trl_settings)
from zenalign.recipe.trl_fields import GRPO_CONFIG, Append, PerReward

log = logging.getLogger(__name__)


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


Sources = dict[tuple[str, ...], tuple[str, Any, Optional[tuple[str, ...]]]]


def check_conflicts(sources: Sources, origin: str, value: Any, prefix: tuple[str, ...],
                    key: Optional[tuple[str, ...]] = None) -> None:
    """Refuse a field set to two different values by two options written differently (a dotted
    key and a section mapping, two mappings, a TRL name and the field it sets), naming both. The
    very same key given again (``run.steps=10 ... run.steps=12``) is a plain override: the last one
    wins. ``prefix`` is the field the value sets; ``key`` how it was written (default: the same)."""
    key = prefix if key is None else key
    for path, item in leaf_paths(prefix, value).items():
        direct = key if path == prefix else None  # the key names this very field
        for where, (seen, mine) in [(path, (sources.get(path), item)), *_items_apart(sources, path, item)]:
            if seen is not None and seen[1] != mine and not (direct is not None and seen[2] == direct):
                raise RecipeError(f"{seen[0]} and {origin} both set {'.'.join(where)} ({seen[1]!r} vs {mine!r}); give it once")
        sources[path] = (origin, item, direct)


def _items_apart(sources: Sources, path: tuple[str, ...], item: Any) -> list:
    """A list and one of its items set apart (``grpo.adam_betas`` and TRL's ``adam_beta1``, which sets
    ``grpo.adam_betas.0``): the item's path, what was set there before and what is set now."""
    found = []
    parent = sources.get(path[:-1]) if path[-1].isdigit() else None
    if parent is not None and isinstance(parent[1], (list, tuple)) and int(path[-1]) < len(parent[1]):
        found.append((path, ((parent[0], parent[1][int(path[-1])], None), item)))
    for i, element in enumerate(item if isinstance(item, (list, tuple)) else ()):
        found.append(((*path, str(i)), (sources.get((*path, str(i))), element)))
    return found


def apply_override(data: dict[str, Any], text: str, sources: Optional[Sources] = None,
                   requirements: Optional[list[Requirement | Moved]] = None) -> None:
    """One ``key.path=value`` override into ``data``. With ``requirements`` (a GRPO recipe), TRL's
    names are taken too (``grpo.beta=0.02``, ``beta=0.02``, ``grpo={beta: 0.02}``)."""
    keys, value = parse_override(text)
    where = f"override '{text}'"
    assignments = [Setting(tuple(keys), value, where, tuple(keys))]
    if requirements is not None:
        section = keys[0] if len(keys) == 2 else None
        if len(keys) <= 2 and is_trl_name(section, keys[-1]):
            assignments = trl_settings(keys[-1], value, ".".join(keys), where, requirements, origin=where)
        elif section == "grpo" and keys[-1] in RENAMED:
            assignments = renamed_settings(keys[-1], value, ".".join(keys), requirements, origin=where)
        elif len(keys) == 1 and keys[0] in FLAT_SECTIONS and isinstance(value, dict):
            own, settings = split_trl(keys[0], value, where, requirements, f"{keys[0]}.")
            assignments = [Setting(tuple(keys), own, where, tuple(keys)), *(replace(s, origin=where) for s in settings)]
    for item in expand(assignments, data):
        if sources is not None and not isinstance(item.value, Append):
            check_conflicts(sources, item.origin, item.value, item.path, item.key)
        assign(data, item.path, item.value, where)


def expand(settings: Sequence[Setting], data: dict[str, Any]) -> list[Setting]:
    """Settings with ``PerReward`` values (TRL's reward_weights) as one setting per reward entry."""
    out = []
    for item in settings:
        if not isinstance(item.value, PerReward):
            out.append(item)
            continue
        rewards = data.get("rewards")
        count = len(rewards) if isinstance(rewards, list) else 0
        if count != len(item.value.values):
            raise RecipeError(f"{item.origin} gives {len(item.value.values)} weights, but the recipe has {count} "
                              f"rewards; give one weight per reward")
        out += [replace(item, path=("rewards", str(i), "weight"), value=w) for i, w in enumerate(item.value.values)]
    return out


def assign(data: dict[str, Any], path: tuple[str, ...], value: Any, where: str) -> None:
    """``data`` at ``path`` = ``value``: a mapping given for a section merges into it
    (:func:`merge_section`), ``Append`` adds its entry to the list there (once), and a number
    indexes a list (one made from the schema's default where the recipe has none: adam_betas)."""
    node: Any = data
    for depth, key in enumerate(path[:-1]):
        if depth == 1 and path[0] in FLAT_SECTIONS and path[2].isdigit() and isinstance(node, dict) and node.get(key) is None:
            node[key] = list(schema_default(path[:2]))  # grpo.adam_betas.0: the default pair, then its first item
        node = _child(node, key, where)
    last = path[-1]
    if isinstance(value, Append):
        if not isinstance(node, dict):
            raise RecipeError(f"{where}: '{'.'.join(path[:-1])}' is not a section")
        entries = node[last] if isinstance(node.get(last), list) else []
        node[last] = entries if value.entry in entries else [*entries, dict(value.entry)]
    elif isinstance(node, list):
        node[_index(node, last, where)] = value
    elif isinstance(node, dict):
        merge_section(node, last, value)
    else:
        raise RecipeError(f"{where}: '{'.'.join(path[:-1])}' is not a section")


def schema_default(path: tuple[str, ...]) -> Any:
    """The schema's default of ``section.field`` (an empty list for a field the section does not have)."""
    field = Recipe.model_fields[path[0]].annotation.model_fields.get(path[1])
    if field is None:
        return []
    return field.default_factory() if field.default_factory is not None else field.default


def lookup(data: Any, path: tuple[str, ...]) -> Any:
    """``data`` at ``path`` (dict keys, list indices), or MISSING."""
    for key in path:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, (list, tuple)) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        else:
            return MISSING
    return data


MISSING = object()


def translate_trl(data: dict[str, Any], source: str, requirements: list[Requirement | Moved]) -> dict[str, Any]:
    """A recipe file's TRL names (at its top level and in its sections) as the fields they set;
    one that sets a field the file also sets, to another value, is refused naming both."""
    own, settings = split_recipe(data, source, requirements)
    sources: Sources = {}
    for item in expand(settings, own):
        if isinstance(item.value, Append):
            assign(own, item.path, item.value, source)
            continue
        present = lookup(own, item.path)
        if present is not MISSING and item.path not in sources:  # the file's own value, not an earlier setting's
            check_conflicts(sources, f"{source}: {'.'.join(item.path)}", present, item.path)
        check_conflicts(sources, item.origin, item.value, item.path, item.key)
        assign(own, item.path, item.value, source)
    return own


def _child(node: Any, key: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, where)]
    if not isinstance(node, dict):
        raise RecipeError(f"{where}: cannot descend into '{key}' (not a section)")
    if key not in node or node[key] is None:
        node[key] = {}
    return node[key]


def _index(node: list, key: str, where: str) -> int:
    try:
        i = int(key)
    except ValueError:
        raise RecipeError(f"{where}: '{key}' must be a list index (0..{len(node) - 1})") from None
    if not 0 <= i < len(node):
        raise RecipeError(f"{where}: index {i} is out of range; the list has {len(node)} entries")
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
    requirements: Sequence[Requirement] = (),
) -> LoadedRecipe:
    """Take TRL's names as the fields they set, apply overrides, load the recipe's plugins, and
    validate against the installed types. ``requirements``: those of TRL names already translated."""
    pending = list(requirements)
    data = translate_trl(copy.deepcopy(data), source, pending)
    sources: Sources = {}
    for text in overrides:
        apply_override(data, text, sources, pending)
    for requirement in pending:
        if isinstance(requirement, Requirement) and lookup(data, requirement.path) is MISSING:
            raise RecipeError(requirement.message)
    plugin_specs = data.get("plugins") or []
    if not isinstance(plugin_specs, list) or not all(isinstance(s, str) for s in plugin_specs):
        raise RecipeError(f"{source}: plugins: expected a list of module names or .py paths")
    load_plugins(plugin_specs, base_dir)
    registry = collect_registry()
    older = drop_foreign_loss_settings(data, registry, [item for item in pending if isinstance(item, Moved)], source)
    model = build_recipe_model(registry)
    try:
        recipe = model.model_validate(data)
    except ValidationError as exc:
        renamed = {f"grpo.{name}": target for name, target in RENAMED.items()}
        raise RecipeError(format_validation_error(exc, model, source, overrides, renamed)) from exc
    check_group_size(recipe, registry, source, overrides)
    recipe.grpo._older = older  # what a plugin reading recipe.grpo.clip_epsilon (the older name) still gets
    return LoadedRecipe(recipe, source, base_dir, name, list(overrides), registry)


def drop_foreign_loss_settings(data: dict[str, Any], registry: PluginRegistry, moved: Sequence[Moved],
                               source: str) -> dict[str, Any]:
    """Loss options set by an older or a TRL name that the recipe's loss does not have (gspo has no
    clip_epsilon) are taken out of the loss section, with a warning, and returned: before the loss owned
    its hyperparameters the built-in losses but grpo ignored them (a plugin that reads them by their
    older name still gets them). Written under their new names (``loss.clip_epsilon``) they are errors."""
    loss, dropped = data.get("loss"), {}
    if not isinstance(loss, dict) or not moved:
        return dropped
    loss_type = registry.types.get("loss", {}).get(loss.get("type", registry.default("loss")))
    for item in moved if loss_type is not None else ():
        name = item.path[1]
        if name not in loss_type.options.model_fields and name in loss and loss[name] == item.value:
            dropped[name] = loss.pop(name)
            log.warning("%s: %s: loss '%s' has no option '%s'; left out", source, item.origin, loss_type.name, name)
    return dropped


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


def recipe_from_options(options: dict[str, Any], name: str) -> LoadedRecipe:
    """Build a recipe from keyword arguments: section names (``grpo={...}``), any field of
    model/sampling/grpo/engine/run by its own name (``group_size=12``), or TRL's name for it
    (``num_generations=12``)."""
    owner = {field: section for section in FLAT_SECTIONS for field in Recipe.model_fields[section].annotation.model_fields}
    data: dict[str, Any] = {}
    sources: Sources = {}
    requirements: list[Requirement | Moved] = []
    for key, value in options.items():
        given = f"{key}={value!r}"
        if key in Recipe.model_fields:  # a section: merged with flat fields given for it, in any order
            own, settings = split_trl(key, value, "GRPOTrainer", requirements) if key in FLAT_SECTIONS and \
                isinstance(value, dict) else (value, [])
            items = [Setting((key,), own, given, (key,)), *(replace(s, origin=given) for s in settings)]
        elif key in GRPO_CONFIG:  # TRL's name (some are zenalign's too, for the same field: TRL's values then also work)
            items = trl_settings(key, value, key, "GRPOTrainer", requirements,
                                 origin=given if key in owner else f"{given} (TRL's name for {GRPO_CONFIG[key].target})")
        elif key in owner:
            items = [Setting((owner[key], key), value, given, (key,))]
        elif key in RENAMED:
            items = renamed_settings(key, value, key, requirements, origin=f"{given} (now {RENAMED[key]})")
        else:
            raise RecipeError(
                f"GRPOTrainer: unknown option '{key}'; options are recipe sections ({', '.join(Recipe.model_fields)}), "
                f"fields of {', '.join(FLAT_SECTIONS)} such as group_size, clip_epsilon, kl_coef, learning_rate, steps, "
                f"or TRL's GRPOConfig names (docs/from-trl.md)"
            )
        for item in expand(items, data):
            if not isinstance(item.value, Append):
                check_conflicts(sources, item.origin, item.value, item.path, item.key)
            assign(data, item.path, item.value, "GRPOTrainer")
    return validate_recipe(data, source="GRPOTrainer(...)", base_dir=Path.cwd(), name=name, requirements=requirements)
