"""What a plugin hands to zenalign: reward source, normalizer and task *types*, and the
protocols their instances follow.

A type is a name, a pydantic options model and a factory. A recipe entry such as
``{type: regex_match, name: format, pattern: "^\\d+$"}`` is validated against the type's
options model (merged with the common fields of its section), then the factory builds the
instance. Factories take only the arguments they name, out of ``options`` and ``context``,
the same rule pluggy applies to hook implementations.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from zenalign.recipe import Recipe


class Options(BaseModel):
    """Base for plugin option models: unknown keys are errors, as everywhere in a recipe."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class BuildContext:
    """What a factory may need besides its options.

    ``base_dir`` is the directory relative paths in the recipe are resolved against (the recipe
    file's directory, or the working directory for the Python API).
    """

    recipe: "Recipe"
    base_dir: Path
    tokenizer: Any = None
    device: Any = None

    def resolve_path(self, path: str | Path) -> Path:
        """Resolve a path from the recipe relative to the recipe's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


@dataclass(frozen=True)
class PluginType:
    """A named, configurable kind of plugin object."""

    name: str
    options: type[BaseModel]
    factory: Callable[..., Any]
    description: str = ""
    default: bool = False  # the type a recipe gets when it leaves the section out (one per kind)

    def summary(self) -> str:
        """The description, or the first line of the factory's docstring."""
        if self.description:
            return self.description
        doc = inspect.getdoc(self.factory) or ""
        return doc.splitlines()[0] if doc else ""

    def build(self, options: BaseModel, context: BuildContext | None = None) -> Any:
        """Call the factory with the arguments it names (``options`` and/or ``context``)."""
        available = {"options": options, "context": context}
        try:
            params = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):  # builtins without a signature
            return self.factory(options)
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return self.factory(**available)
        wanted = {k: v for k, v in available.items() if k in params}
        return self.factory(**wanted)


class RewardSourceType(PluginType):
    """A reward source kind, named in a recipe's ``rewards: [{type: NAME, ...}]``."""


class NormalizerType(PluginType):
    """An advantage normalizer kind, named in a recipe's ``normalizer: {type: NAME, ...}``."""


class TaskType(PluginType):
    """A prompt source kind, named in a recipe's ``data: {type: NAME, ...}``."""


@dataclass
class ScoreBatch:
    """The completions a reward source scores, ``N = prompts_per_step * group_size`` of them.

    Completions are laid out group by group: rows ``g*G .. g*G+G-1`` answer the same prompt.
    ``columns`` holds, for every completion, the other fields of its prompt record
    (for example ``answer``), so ``columns["answer"][i]`` belongs to ``completions[i]``.
    """

    prompts: list[str]
    completions: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    completion_ids: list[list[int]] = field(default_factory=list)
    group_size: int = 1
    step: int = 0

    def __len__(self) -> int:
        return len(self.completions)


Scores = "Sequence[float | None] | Mapping[str, Sequence[float | None]] | torch.Tensor"


@runtime_checkable
class RewardSource(Protocol):
    """Scores completions. NaN or None means "abstain" for that completion.

    ``score`` returns one score per completion, or, for a source that produces several named
    objectives, a mapping ``{objective: scores}`` (or an ``(N, K)`` tensor in the order of the
    optional ``objectives`` attribute).
    """

    def score(self, batch: ScoreBatch) -> Any: ...


@dataclass(frozen=True)
class Objectives:
    """The objectives a normalizer combines, in the column order of the reward tensor.

    ``roles[k]`` is "reward" or "constraint"; a constraint wants the batch mean of objective k to
    be ``>=`` or ``<=`` (``directions[k]``) ``thresholds[k]``. Left empty, every objective is a reward.
    """

    names: tuple[str, ...]
    weights: "torch.Tensor"  # (K,)
    roles: tuple[str, ...] = ()
    thresholds: tuple[Optional[float], ...] = ()
    directions: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def role(self, k: int) -> str:
        return self.roles[k] if self.roles else "reward"

    @property
    def reward_indices(self) -> list[int]:
        return [k for k in range(len(self.names)) if self.role(k) == "reward"]

    @property
    def constraint_indices(self) -> list[int]:
        return [k for k in range(len(self.names)) if self.role(k) == "constraint"]


@runtime_checkable
class AdvantageNormalizer(Protocol):
    """Turns rewards ``(P, G, K)`` (prompts × group × objectives, NaN = abstain) into
    advantages ``(P, G)``. It must never return NaN."""

    def __call__(self, rewards: "torch.Tensor", objectives: Objectives) -> "torch.Tensor": ...


@runtime_checkable
class Task(Protocol):
    """A source of prompt records: dicts with a ``prompt`` string and any other fields."""

    def train_prompts(self) -> list[dict[str, Any]]: ...

    def eval_prompts(self) -> list[dict[str, Any]]: ...
