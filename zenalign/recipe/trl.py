"""TRL's option names, wherever zenalign takes options: ``GRPOTrainer(beta=0.04)``, a recipe's top
level or one of its sections (``beta: 0.04``, ``grpo: {beta: 0.04}``), and dotted overrides
(``grpo.beta=0.04``, ``beta=0.04``).

Each name is looked up in :data:`~zenalign.recipe.trl_fields.GRPO_CONFIG`, which gives the
zenalign fields it sets or why it has no equivalent. A TRL name is one that is not already a field
where it is written: ``run.seed`` is zenalign's own, ``seed`` at the top level is TRL's (it sets
``run.seed``).

Giving a TRL name and the field it sets with different values is refused, naming both
(:mod:`zenalign.recipe.loader` applies the settings and checks that).

zenalign's own older names of the loss's hyperparameters (:data:`RENAMED`: ``grpo.clip_epsilon``
is now ``loss.clip_epsilon``) are taken the same way, wherever a TRL name would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from zenalign.errors import RecipeError
from zenalign.recipe.schema import MOVED_TO_LOSS, Recipe
from zenalign.recipe.trl_fields import ANY, GRPO_CONFIG, TRLField

# Recipe sections whose fields GRPOTrainer takes by name, and where TRL's names may be written.
FLAT_SECTIONS = ("model", "sampling", "grpo", "engine", "run")

# grpo.NAME (and GRPOTrainer's NAME=) before the loss owned its hyperparameters -> where it is now.
RENAMED = {old: f"loss.{new}" for old, new in MOVED_TO_LOSS.items()}


@dataclass(frozen=True)
class Setting:
    """A zenalign field set by a TRL name: its path, its value, and how the user wrote it."""

    path: tuple[str, ...]
    value: Any
    origin: str  # for messages: "grpo.beta (TRL's name for grpo.kl_coef)"
    key: tuple[str, ...]  # the name as written, as a path: ("grpo", "beta")


@dataclass(frozen=True)
class Moved:
    """A loss option set by an older or a TRL name (``grpo.clip_epsilon``, ``epsilon``). A loss without
    that option (gspo has no clip_epsilon) leaves it out, as the built-in losses but grpo ignored it
    before the loss owned its hyperparameters: :func:`zenalign.recipe.loader.drop_foreign_loss_settings`."""

    path: tuple[str, ...]
    value: Any
    origin: str


@dataclass(frozen=True)
class Requirement:
    """A TRL field accepted only if the finished recipe sets ``path`` too (num_train_epochs: max_steps)."""

    path: tuple[str, ...]
    message: str


def section_fields(section: str) -> set[str]:
    return set(Recipe.model_fields[section].annotation.model_fields)


def is_trl_name(section: Optional[str], key: Any) -> bool:
    """``key``, written at the top level (``section`` None) or in ``section``, is a TRL name to
    translate: a GRPOConfig field that is not a field there already."""
    if not isinstance(key, str) or key not in GRPO_CONFIG:
        return False
    if section is None:
        return key not in Recipe.model_fields
    return section in FLAT_SECTIONS and key not in section_fields(section)


def _same(a: Any, b: Any) -> bool:
    """Equal as TRL would read them: 1 and 1.0 alike, but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def accepted(field: TRLField, value: Any) -> bool:
    return any(a == ANY or _same(a, value) for a in field.accepts)


def trl_settings(name: str, value: Any, spelled: str, where: str, requirements: list[Requirement | Moved],
                 origin: Optional[str] = None) -> list[Setting]:
    """What TRL's field ``name`` given as ``value`` sets: the zenalign fields it maps to, or nothing
    for a value that asks for nothing; any other value is a RecipeError naming it (``spelled``, as
    written) and saying why. ``where`` prefixes messages (the file, GRPOTrainer, the override);
    ``origin`` names the setting in conflict messages (default: ``spelled (TRL's name for ...)``)."""
    field = GRPO_CONFIG[name]
    if not field.target:
        if accepted(field, value):
            return []
        others = [repr(a) for a in field.accepts if a is not None and a != ANY]
        message = (f"{where}: {spelled}={value!r} (TRL) has no zenalign equivalent: {field.note}"
                   f"{'; accepted: ' + ', '.join(others) if others else ''}")
        if field.unless:
            requirements.append(Requirement(tuple(field.unless.split(".")), message))
            return []
        raise RecipeError(message)
    try:
        settings = field.convert(value)
    except ValueError as exc:
        raise RecipeError(f"{where}: {spelled}={value!r} (TRL) {exc}") from None
    origin = origin or f"{spelled} (TRL's name for {field.target})"
    key = tuple(spelled.split("."))
    return moved([Setting(tuple(path.split(".")), item, origin, key) for path, item in settings.items()], requirements)


def renamed_settings(name: str, value: Any, spelled: str, requirements: list[Requirement | Moved],
                     origin: Optional[str] = None) -> list[Setting]:
    """What an older name of a loss option (:data:`RENAMED`), written ``spelled``, sets."""
    target = RENAMED[name]
    setting = Setting(tuple(target.split(".")), value, origin or f"{spelled} (now {target})", tuple(spelled.split(".")))
    return moved([setting], requirements)


def moved(settings: list[Setting], requirements: list[Requirement | Moved]) -> list[Setting]:
    """``settings``, with those of one loss option noted in ``requirements`` (:class:`Moved`)."""
    requirements += [Moved(s.path, s.value, s.origin) for s in settings if len(s.path) == 2 and s.path[0] == "loss"]
    return settings


def split_trl(section: Optional[str], mapping: dict[str, Any], where: str, requirements: list[Requirement | Moved],
              prefix: str = "") -> tuple[dict[str, Any], list[Setting]]:
    """A mapping (a recipe's top level, or one of its sections) without its TRL names, and what
    those set. ``prefix`` is the section's path as written (``grpo.``), for messages."""
    own: dict[str, Any] = {}
    settings: list[Setting] = []
    for key, value in mapping.items():
        if is_trl_name(section, key):
            settings += trl_settings(key, value, f"{prefix}{key}", where, requirements)
        elif section == "grpo" and key in RENAMED:
            settings += renamed_settings(key, value, f"{prefix}{key}", requirements)
        else:
            own[key] = value
    return own, settings


def split_recipe(data: dict[str, Any], where: str, requirements: list[Requirement | Moved]) -> tuple[dict[str, Any], list[Setting]]:
    """A whole recipe mapping without TRL's names (at its top level and in its sections), and what they set."""
    own, settings = split_trl(None, data, where, requirements)
    for section in FLAT_SECTIONS:
        if isinstance(own.get(section), dict):
            own[section], more = split_trl(section, own[section], where, requirements, f"{section}.")
            settings += more
    return own, settings
