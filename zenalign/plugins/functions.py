"""Plain reward functions as reward sources, with TRL's calling convention."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from zenalign.errors import RecipeError, one_line
from zenalign.plugins.api import ScoreBatch, objective_names

BATCH_FIELDS = ("prompts", "completions", "completion_ids", "group_size", "step", "environments")


class FunctionReward:
    """Adapts a plain function into a reward source.

    The function receives, by parameter name, any of ``prompts``, ``completions``,
    ``completion_ids``, ``group_size``, ``step`` and the prompt records' other fields (for
    example ``answer``), each a list with one entry per completion; a ``**kwargs`` parameter
    receives them all. It returns one score per completion (or ``{objective: scores}``).
    This is the convention of TRL's reward functions, so those work unchanged: when the prompts
    are conversational (a record's ``prompt`` is a list of messages), ``prompts`` holds those
    message lists and each completion is ``[{"role": "assistant", "content": text}]``; for a
    multi-turn episode, every message the policy and its tools wrote, and ``environments`` holds
    each episode's environment object, as in TRL.
    """

    def __init__(self, function: Callable[..., Any], extra_kwargs: Mapping[str, Any] | None = None, name: str | None = None):
        self.function = function
        self.extra_kwargs = dict(extra_kwargs or {})
        self.name = name or getattr(function, "__name__", type(function).__name__)
        # the objective's name when its recipe entry gives none: the function's, as the Python API names it
        own = getattr(function, "__name__", None)
        self.default_name = own if own and own != "<lambda>" else None
        try:
            self._params = inspect.signature(function).parameters
        except (TypeError, ValueError):
            self._params = {}
        self._takes_all = any(p.kind is p.VAR_KEYWORD for p in self._params.values())
        # the record fields it needs by name (parameters without a default): completions whose records
        # lack one are not passed to it, and abstain (Scorer); a warning at start counts those records
        self.reads_fields = tuple(name for name, p in self._params.items()
                                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty
                                  and name not in BATCH_FIELDS and name not in self.extra_kwargs)
        if objective_names(function):
            self.objectives = objective_names(function)

    def score(self, batch: ScoreBatch) -> Any:
        chat = bool(batch.prompt_messages)  # TRL's conversational format: messages in, messages out
        available: dict[str, Any] = {
            "prompts": batch.prompt_messages if chat else batch.prompts,
            "completions": (batch.completion_messages or [[{"role": "assistant", "content": c}] for c in batch.completions])
                           if chat else batch.completions,
            "environments": batch.environments or None,
            "completion_ids": batch.completion_ids,
            "group_size": batch.group_size,
            "step": batch.step,
            **batch.columns,
            **self.extra_kwargs,
        }
        if self._takes_all:
            return self.function(**available)
        # every parameter without a default is available: a batch field, an extra keyword, or a record
        # field that the Scorer checked every completion of this batch has (reads_fields)
        return self.function(**{name: available[name] for name in self._params if name in available})


def import_object(spec: str, base_dir: Path, where: str) -> Any:
    """What ``'module:attribute'`` or ``'path/to/file.py:attribute'`` (relative to ``base_dir``) names;
    a missing file, module or attribute is a one-line :class:`RecipeError` starting with ``where``."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise RecipeError(f"{where}: {spec!r}: expected 'module:attribute' or 'path/to/file.py:attribute'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            path = (path if path.is_absolute() else base_dir / path).resolve()
            if not path.is_file():
                raise RecipeError(f"{where}: file '{module_name}' does not exist (looked for {path})")
            unique = f"zenalign_user_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
            module = sys.modules.get(unique)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(unique, path)
                module = importlib.util.module_from_spec(loader_spec)
                loader_spec.loader.exec_module(module)
                sys.modules[unique] = module
        else:
            module = importlib.import_module(module_name)
    except RecipeError:
        raise
    except Exception as exc:
        raise RecipeError(f"{where}: cannot import '{module_name}': {type(exc).__name__}: {one_line(exc)}") from exc
    try:
        found = getattr(module, attr)
    except AttributeError:
        raise RecipeError(f"{where}: '{module_name}' has no attribute '{attr}'") from None
    if not callable(found):
        raise RecipeError(f"{where}: '{spec}' is a {type(found).__name__}, not a function or class")
    return found
