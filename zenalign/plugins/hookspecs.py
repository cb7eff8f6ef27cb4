"""Every hook zenalign calls, in one place.

A plugin is a module (or object) with functions marked ``@zenalign.hookimpl`` whose names match
the specifications below. An implementation takes only the arguments it uses. Plugins arrive
through the entry-point group ``zenalign`` (built-ins included) or the recipe's ``plugins:``
list. Event hooks receive the run's :class:`~zenalign.plugins.api.RunContext`, never the trainer.
See docs/writing-a-plugin.md, which documents every hook below (a test checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from zenalign.plugins.api import (BuildContext, EnvironmentType, NormalizerType, PolicyLossType, RewardSource, RewardSourceType,
                                      RolloutFilterType, RunContext, TaskType)

PROJECT = "zenalign"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ----------------------------------------------------------------------------------------------
# Types: what a plugin provides, by name, for the recipe's sections


@hookspec
def zenalign_reward_source_types() -> list[RewardSourceType]:
    """Return the reward source types this plugin provides.

    Call rule: all results are collected. A name provided by two plugins is an error that names
    both.
    """


@hookspec
def zenalign_normalizer_types() -> list[NormalizerType]:
    """Return the advantage normalizer types this plugin provides.

    Call rule: all results are collected. A name provided by two plugins is an error that names
    both.
    """


@hookspec
def zenalign_task_types() -> list[TaskType]:
    """Return the prompt source (task) types this plugin provides.

    Call rule: all results are collected. A name provided by two plugins is an error that names
    both.
    """


@hookspec
def zenalign_policy_loss_types() -> list[PolicyLossType]:
    """Return the policy loss types this plugin provides (see ``PolicyLoss``).

    Call rule: all results are collected. A name provided by two plugins is an error that names
    both.
    """


@hookspec
def zenalign_rollout_filter_types() -> list[RolloutFilterType]:
    """Return the rollout filter types this plugin provides (see ``RolloutFilter``).

    Call rule: all results are collected. A name provided by two plugins is an error that names
    both.
    """


@hookspec
def zenalign_environment_types() -> list[EnvironmentType]:
    """Return the environment types this plugin provides (see ``Environment``): what a recipe's
    ``environment: {type: NAME}`` names for multi-turn episodes with tools.

    Call rule: all results are collected. A name provided by two plugins is an error that names
    both.
    """


# ----------------------------------------------------------------------------------------------
# Adapters: turning objects handed to the Python API into plugin objects


@hookspec(firstresult=True)
def zenalign_reward_from_object(obj: Any, context: BuildContext) -> RewardSource | None:
    """Turn an object handed to ``GRPOTrainer(reward_model=...)`` into a reward source, if this
    plugin recognises it (for example a sequence-classification model, or the path of one).

    Call rule: the first non-None result wins; with none, a plain callable is used as a reward
    function.
    """


# ----------------------------------------------------------------------------------------------
# Events: called on the main process (rank 0) as a run goes


@hookspec
def zenalign_on_train_start(context: RunContext, start_step: int) -> None:
    """Called once before the first step (and after a resume), with the step training starts at.

    Call rule: every implementation is called; return values are ignored.
    """


@hookspec
def zenalign_on_step_end(context: RunContext, step: int, metrics: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """Called after each training step with the metrics written to ``metrics.jsonl`` and the
    completions written to ``samples.jsonl`` at this step (``[]`` between log steps): each
    ``{"step", "prompt", "completion", "rewards": {objective: score}, "advantage"}``.

    Use it for loggers. Neither argument may be modified. Call rule: every implementation is
    called; return values are ignored.
    """


@hookspec
def zenalign_on_eval_end(context: RunContext, step: int, metrics: dict[str, Any]) -> None:
    """Called after each evaluation with the metrics written to ``eval.jsonl``.

    Call rule: every implementation is called; return values are ignored.
    """


@hookspec
def zenalign_on_train_end(context: RunContext, step: int) -> None:
    """Called once after the last step and the final save.

    Call rule: every implementation is called; return values are ignored.
    """
