"""The run's environment at sampling time: one episode object per rollout, its tools, its reward,
and the budgets of :class:`~zenalign.recipe.schema.EnvironmentEntry`.

An episode object has TRL's ``environment_factory`` shape: ``reset(**record)`` returns None or text
for the last user message, its public methods are tools, an optional ``get_reward()`` scores the
episode. Tools-only environments (``python_tools``, or ``GRPOTrainer(tools=[...])``) have no
episode object: every rollout gets the same plain functions. Whatever an episode object's own
methods raise outside a tool call (``reset``, ``get_reward``, the factory) is a one-line
:class:`~zenalign.errors.PluginError` naming the environment and the method.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from zenalign.errors import PluginError, one_line

SPECIAL = ("reset", "get_reward")  # an episode object's methods that are not tools


@dataclass
class Budgets:
    """How long an episode may go and what a tool may cost (the recipe's ``environment:`` fields)."""

    max_turns: int = 4
    max_episode_tokens: Optional[int] = None
    tool_timeout_s: float = 10.0
    max_tool_output_chars: int = 2000


@dataclass
class Episode:
    """One rollout's environment: its object (None for tools only), its tools by name, and the
    text ``reset`` returned."""

    state: Any
    tools: dict[str, Callable[..., Any]]
    observation: Optional[str] = None
    seconds: float = 0.0  # time spent in the environment: reset, tools, get_reward


class Choice:
    """Several episode sources, one chosen by each record's ``environment`` field (TRL's
    ``environment_factory`` given as a dict of factories)."""

    def __init__(self, sources: dict[str, Any]):
        self.sources = dict(sources)


class Environments:
    """Makes and checks episodes: ``source`` is what the environment plugin built (its
    ``new_episode()`` gives one episode object per rollout, or None), or a :class:`Choice` of
    several; ``tools`` the plain functions every episode may call. ``name`` names the environment in
    errors and its reward objective."""

    def __init__(self, name: str, source: Any, tools: list[Callable[..., Any]], budgets: Budgets):
        self.name, self.budgets = name, budgets
        self.sources = source.sources if isinstance(source, Choice) else {None: source}
        self.tools = list(tools)
        probes = [self._new(key) for key in self.sources]  # one episode of each, made here to check it
        self.has_state = any(p is not None for p in probes)
        for probe in probes:
            if probe is not None and not callable(getattr(probe, "reset", None)):
                raise PluginError(f"environment '{name}': its episode object ({type(probe).__name__}) has no reset(); "
                                  f"an environment's episodes need reset(**record), returning None or text")
        # the classes whose episodes score themselves: one objective each (get_reward)
        self.rewarded = list(dict.fromkeys(type(p) for p in probes
                                           if p is not None and callable(getattr(type(p), "get_reward", None))))
        self.has_reward = bool(self.rewarded)
        # every tool an episode offers, as the chat template describes them (prompt lengths are checked with these)
        offered = self.tools + [m for p in probes if p is not None for m in _methods(p)]
        self.described = list({function.__name__: function for function in offered}.values())
        for function in self.described:
            check_tool(function, name)

    def _new(self, key: Optional[str] = None) -> Any:
        source = self.sources[key]
        try:
            return source.new_episode() if source is not None else None
        except Exception as exc:
            raise PluginError(f"environment '{key or self.name}': making an episode raised "
                              f"{type(exc).__name__}: {one_line(exc)}") from exc

    def _source_of(self, record: dict[str, Any]) -> tuple[Optional[str], dict[str, Any]]:
        """The key of the record's source, and the fields its ``reset`` gets (without the choice)."""
        if None in self.sources:
            return None, record
        key = record.get("environment")
        if key not in self.sources:
            raise PluginError(f"environment: a record's 'environment' is {key!r}; the environments given are "
                              f"{', '.join(map(repr, self.sources))}")
        return key, {k: v for k, v in record.items() if k != "environment"}

    def open(self, record: dict[str, Any]) -> Episode:
        """A fresh episode for ``record``, reset with the record's fields."""
        start = time.perf_counter()
        key, fields = self._source_of(record)
        state = self._new(key)
        observation = None
        if state is not None:
            try:
                observation = state.reset(**fields)
            except Exception as exc:
                raise PluginError(f"environment '{self.name}': reset() raised {type(exc).__name__}: {one_line(exc)}") from exc
            if observation is not None and not isinstance(observation, str):
                raise PluginError(f"environment '{self.name}': reset() returned a {type(observation).__name__}; "
                                  f"it returns None or text for the last user message")
        tools = {fn.__name__: fn for fn in self.tools + (_methods(state) if state is not None else [])}
        return Episode(state, tools, observation, time.perf_counter() - start)



class EnvironmentReward:
    """An environment's ``get_reward()`` as a reward source: one more objective, named after the
    environment, scored on each episode's environment object (``ScoreBatch.environments``). With a
    :class:`Choice` of environments, one per class that has ``get_reward``, named after the class;
    the other classes' episodes abstain, as in TRL."""

    def __init__(self, environments: Environments, scores: Optional[type] = None):
        self.environments, self.scores = environments, scores  # scores: with several classes, this one's episodes
        self.default_name = scores.__name__ if scores is not None else environments.name

    def score(self, batch: Any) -> list[Optional[float]]:
        scores = []
        for state in batch.environments:
            if self.scores is not None and type(state) is not self.scores:
                scores.append(None)  # another environment's episode: it abstains
                continue
            try:
                scores.append(state.get_reward())
            except Exception as exc:
                raise PluginError(f"environment '{self.environments.name}': get_reward() raised {type(exc).__name__}: "
                                  f"{one_line(exc)}") from exc
        return scores


def _methods(state: Any) -> list[Callable[..., Any]]:
    """An episode object's tools: its public methods other than reset and get_reward (looked up on
    the class, so properties are not evaluated)."""
    return [getattr(state, name) for name, _ in inspect.getmembers(type(state), predicate=inspect.isfunction)
            if not name.startswith("_") and name not in SPECIAL]


def check_tool(function: Callable[..., Any], environment: str) -> dict[str, Any]:
    """The tool's JSON schema, as the chat template gets it; a function transformers cannot describe
    (no docstring, an argument without a type hint or a description) is an error naming it."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(function)
    except Exception as exc:
        raise PluginError(f"environment '{environment}': tool {getattr(function, '__name__', function)!r} cannot be "
                          f"described to the model: {one_line(exc)} (a tool needs type hints and a Google-style "
                          f"docstring with an Args: line per argument)") from exc


@dataclass
class EpisodeLog:
    """What happened in a batch of episodes, one entry per row: the messages the policy and the
    tools wrote, the turns taken, and the tool calls by outcome."""

    messages: list[list[dict[str, Any]]]
    episodes: list[Episode]
    turns: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # each row's prompt as rendered (with tools, observation)

    @property
    def states(self) -> list[Any]:
        """The episode objects (TRL reward functions' ``environments``); None for tools only."""
        return [e.state for e in self.episodes]

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.episodes)
