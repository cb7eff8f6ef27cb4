"""Plain reward functions as reward sources, with TRL's calling convention."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from zenalign.errors import RewardError
from zenalign.plugins.api import ScoreBatch, objective_names

BATCH_FIELDS = ("prompts", "completions", "completion_ids", "group_size", "step")


class FunctionReward:
    """Adapts a plain function into a reward source.

    The function receives, by parameter name, any of ``prompts``, ``completions``,
    ``completion_ids``, ``group_size``, ``step`` and the prompt records' other fields (for
    example ``answer``), each a list with one entry per completion; a ``**kwargs`` parameter
    receives them all. It returns one score per completion (or ``{objective: scores}``).
    This is the convention of TRL's reward functions, so those work unchanged: when the prompts
    are conversational (a record's ``prompt`` is a list of messages), ``prompts`` holds those
    message lists and each completion is ``[{"role": "assistant", "content": text}]``.
    """

    def __init__(self, function: Callable[..., Any], extra_kwargs: Mapping[str, Any] | None = None, name: str | None = None):
        self.function = function
        self.extra_kwargs = dict(extra_kwargs or {})
        self.name = name or getattr(function, "__name__", type(function).__name__)
        try:
            self._params = inspect.signature(function).parameters
        except (TypeError, ValueError):
            self._params = {}
        self._takes_all = any(p.kind is p.VAR_KEYWORD for p in self._params.values())
        # the record fields it asks for by name (a warning at start counts the records that lack them)
        self.reads_fields = tuple(name for name, p in self._params.items()
                                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in BATCH_FIELDS
                                  and name not in self.extra_kwargs)
        if objective_names(function):
            self.objectives = objective_names(function)

    def score(self, batch: ScoreBatch) -> Any:
        chat = bool(batch.prompt_messages)  # TRL's conversational format: messages in, messages out
        available: dict[str, Any] = {
            "prompts": batch.prompt_messages if chat else batch.prompts,
            "completions": [[{"role": "assistant", "content": c}] for c in batch.completions] if chat else batch.completions,
            "completion_ids": batch.completion_ids,
            "group_size": batch.group_size,
            "step": batch.step,
            **batch.columns,
            **self.extra_kwargs,
        }
        if self._takes_all:
            return self.function(**available)
        kwargs = {}
        for pname, param in self._params.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if pname in available:
                kwargs[pname] = available[pname]
            elif param.default is param.empty:
                raise RewardError(
                    f"reward function '{self.name}' asks for '{pname}', which the batch does not have; "
                    f"available: {', '.join(available)}"
                )
        return self.function(**kwargs)
