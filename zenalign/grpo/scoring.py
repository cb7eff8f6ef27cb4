"""Scoring: run every reward source on a batch and assemble the reward matrix ``(N, K)``.

Each reward source adds one objective (named after its recipe entry) or several (named by its
``objectives`` attribute). NaN (or None) is an abstention. Anything else a source might do wrong
(raise anything, ``SystemExit`` included; return the wrong number of scores, text or infinity;
run past its ``timeout_s``) becomes a one-line :class:`RewardError` naming the source.

Each source gets its own copy of the batch (:func:`reward_view`): new lists, its own copy of
anything mutable inside them (message dicts, list-valued columns), and token id rows as tuples, so
a source that changes what it was given cannot change what the next source, samples.jsonl or the
trackers see.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import sysconfig
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from zenalign.data import is_conversational, metadata_columns
from zenalign.errors import RewardError, one_line
from zenalign.plugins import (DeadlineExceeded, FunctionReward, Objectives, ObservesScores, ReportsMetrics, RewardSource, RunContext,
                              ScoreBatch, call_with_deadline, fields_read, objective_names)

@dataclass
class BoundReward:
    """A reward source as configured in a run: its entry name, type, objectives and weights."""

    name: str
    type_name: str
    source: Any
    objectives: list[str]
    weights: list[float]
    where: str = "reward"  # where it was configured: "rewards[0]", "reward_model[1]"
    timeout_s: Optional[float] = None  # longest a score() call may take; None: no limit (the recipe's default: 600)

    @property
    def label(self) -> str:
        return f"{self.where} '{self.name}' ({self.type_name})"


def bind_reward(source: Any, name: str, type_name: str, weight: float = 1.0, where: str = "reward",
                timeout_s: Optional[float] = None) -> BoundReward:
    """Wrap a reward source (or plain callable) with its objective names and weights."""
    if not isinstance(source, RewardSource):
        if not callable(source):
            raise RewardError(
                f"{where} '{name}' is a {type(source).__name__}; give a reward source (an object with "
                f"score(batch)) or a function(prompts, completions, **fields) -> list of floats"
            )
        source = FunctionReward(source, name=name)
    objectives = objective_names(source) or [name]
    if len(set(objectives)) != len(objectives):
        raise RewardError(f"{where} '{name}' ({type_name}) declares duplicate objectives: {objectives}")
    return BoundReward(name, type_name, source, objectives, [float(weight)] * len(objectives), where, timeout_s)


_LIBRARY_DIRS = tuple(str(Path(p).resolve()) for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                                                        sysconfig.get_paths()["platlib"], Path(__file__).parents[1]})


def user_frame(exc: BaseException) -> str:
    """``file:line (in function)`` of the innermost frame of ``exc``'s traceback outside zenalign,
    the standard library and installed packages: the line of the user's reward that failed."""
    found = ""
    for frame, line in traceback.walk_tb(exc.__traceback__):
        path = str(Path(frame.f_code.co_filename).resolve())
        if not path.startswith(_LIBRARY_DIRS) and not frame.f_code.co_filename.startswith("<"):
            found = f"{frame.f_code.co_filename}:{line} (in {frame.f_code.co_name})"
    return found


class Scorer:
    """Runs reward sources and stacks their scores into a ``(N, K)`` float tensor.

    ``on_stuck``: called before the process exits when a source that ran past its ``timeout_s``
    cannot be interrupted (it is stuck inside C code); the trainer releases its run directory there."""

    def __init__(self, rewards: Sequence[BoundReward], on_stuck: Optional[Callable[[], None]] = None):
        if not rewards:
            raise RewardError("rewards: no reward source is configured; add at least one (see `zenalign plugins`)")
        seen: dict[str, str] = {}
        for bound in rewards:
            for objective in bound.objectives:
                if objective in seen:
                    raise RewardError(
                        f"objective '{objective}' is produced by both {seen[objective]} and {bound.label}; "
                        f"give the entries different `name`s"
                    )
                seen[objective] = bound.label
        self.rewards = list(rewards)
        self.on_stuck = on_stuck
        self._silent: dict[str, int] = {}  # objective -> consecutive steps in which it scored nothing

    def __call__(self, batch: ScoreBatch) -> torch.Tensor:
        columns = [self._score_one(bound, batch) for bound in self.rewards]
        return torch.cat(columns, dim=1)  # (N, K)

    def _score_one(self, bound: BoundReward, batch: ScoreBatch) -> torch.Tensor:
        """The source's ``(N, K)`` scores; completions whose records lack (or hold null in) a field it
        reads (``reads_fields``) are not passed to it, and abstain (NaN)."""
        rows = rows_with_fields(batch, fields_read(bound.source))
        if len(rows) == len(batch):
            return self._call(bound, batch)
        scores = torch.full((len(batch), len(bound.objectives)), math.nan, dtype=torch.float64)  # (N, K)
        if rows:
            scores[rows] = self._call(bound, select_rows(batch, rows))
        return scores

    def _call(self, bound: BoundReward, batch: ScoreBatch) -> torch.Tensor:
        view = reward_view(batch)
        try:
            raw = call_with_deadline(lambda: bound.source.score(view), bound.timeout_s,
                                     grace_s=min(30.0, bound.timeout_s or 0.0),
                                     on_stuck=lambda: self._exit_stuck(bound, batch.step))
        except DeadlineExceeded as exc:  # its traceback (in run.log) shows where the source was
            raise RewardError(f"{bound.label} took longer than its timeout_s ({bound.timeout_s:g} s) at step "
                              f"{batch.step}; make it faster or raise timeout_s (null: no limit)") from exc
        except RewardError:
            raise
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: a reward may not end the run by itself
            where = user_frame(exc)
            raise RewardError(
                f"{bound.label} raised {type(exc).__name__}: {one_line(exc)}{f' at {where}' if where else ''} "
                f"(at step {batch.step}); run.log has the traceback, and --debug shows it"
            ) from exc
        return to_matrix(raw, bound, len(batch))

    def _exit_stuck(self, bound: BoundReward, step: int) -> None:
        """A source past its deadline that does not return to Python (stuck in C code): end the process."""
        if self.on_stuck is not None:
            self.on_stuck()
        print(f"zenalign: error: {bound.label} took longer than its timeout_s ({bound.timeout_s:g} s) at step {step} "
              f"and did not stop when interrupted (does it catch every exception?); the checkpoints already written "
              f"are intact", file=sys.stderr, flush=True)
        os._exit(2)

    def check_abstentions(self, rewards: torch.Tensor, names: Sequence[str], patience: int, step: int) -> None:
        """Stop the run when an objective scored no completion at all (every score NaN or None) in
        ``patience`` consecutive steps: a reward that silently returns nothing would otherwise train
        on noise to the end. ``rewards`` is a step's global ``(N, K)``; 0 turns the check off."""
        if patience <= 0:
            return
        silent = torch.isnan(rewards).all(dim=0)                                       # (K,)
        for k, name in enumerate(names):
            self._silent[name] = self._silent.get(name, 0) + 1 if bool(silent[k]) else 0
            if self._silent[name] >= patience:
                label = next((b.label for b in self.rewards if name in b.objectives), f"objective '{name}'")
                raise RewardError(
                    f"{label} scored no completion (every score NaN or None) for objective '{name}' in {patience} "
                    f"consecutive steps (steps {step - patience + 1}-{step}); check what it returns "
                    f"(run.hacking_patience sets the number of steps, 0 turns this check off)")

    def observe(self, batch: ScoreBatch, rewards: torch.Tensor, objectives: Objectives, context: RunContext) -> None:
        """Hand this process's scored batch and its ``(N_local, K)`` rewards to every reward source
        that observes scored batches (:class:`~zenalign.plugins.ObservesScores`)."""
        for bound in self.rewards:
            if isinstance(bound.source, ObservesScores):
                bound.source.on_scored(reward_view(batch), rewards, objectives, context)

    def metrics(self) -> dict[str, float]:
        """What reward sources that report metrics (:class:`~zenalign.plugins.ReportsMetrics`) report,
        each key prefixed with the source's name."""
        out: dict[str, float] = {}
        for bound in self.rewards:
            if isinstance(bound.source, ReportsMetrics):
                out.update({f"{bound.name}/{key}": value for key, value in bound.source.metrics().items()})
        return out


def _own_copy(values: Sequence[Any]) -> list:
    """A new list of ``values``, with its own copy of every element that could be changed in place."""
    return [v if isinstance(v, (str, bytes, int, float, bool, tuple, type(None))) else copy.deepcopy(v) for v in values]


def reward_view(batch: ScoreBatch) -> ScoreBatch:
    """What one reward source sees: new lists (TRL's reward functions get lists), with their own
    copy of every mutable element. ``completion_ids`` rows are tuples (:func:`make_batch`), shared."""
    return replace(batch, prompts=_own_copy(batch.prompts), completions=_own_copy(batch.completions),
                   policy_lengths=list(batch.policy_lengths),
                   columns={name: _own_copy(values) for name, values in batch.columns.items()},
                   prompt_messages=_own_copy(batch.prompt_messages),
                   completion_messages=_own_copy(batch.completion_messages),
                   completion_ids=[ids if isinstance(ids, tuple) else tuple(ids) for ids in batch.completion_ids])


def rows_with_fields(batch: ScoreBatch, fields: Sequence[str]) -> list[int]:
    """The completions whose records hold every one of ``fields`` (not missing, not null)."""
    columns = [batch.columns.get(name) for name in fields]
    return [i for i in range(len(batch)) if all(values is not None and values[i] is not None for values in columns)]


def select_rows(batch: ScoreBatch, rows: Sequence[int]) -> ScoreBatch:
    """The batch of ``rows`` only. Fields come from the prompt records, so ``rows`` (from
    :func:`rows_with_fields`) are whole groups, and ``group_size`` still holds."""
    def pick(values: list) -> list:
        return [values[i] for i in rows] if values else values

    return replace(batch, prompts=pick(batch.prompts), completions=pick(batch.completions),
                   columns={name: pick(values) for name, values in batch.columns.items()},
                   completion_ids=pick(batch.completion_ids), policy_lengths=pick(batch.policy_lengths),
                   prompt_messages=pick(batch.prompt_messages), completion_messages=pick(batch.completion_messages),
                   environments=pick(batch.environments))


def make_batch(prompts: list[str], records: list[dict[str, Any]], completions: list[str],
               completion_ids: list[list[int]], group_size: int, step: int, episodes: Any = None,
               policy_lengths: Sequence[int] = ()) -> ScoreBatch:
    """The :class:`ScoreBatch` for ``group_size`` completions of each record, prompt-major:
    ``prompts`` holds each record's rendered prompt text once; ``episodes`` (a rollout's
    :class:`~zenalign.generation.environment.EpisodeLog`, for multi-turn episodes) adds their
    messages and environment objects."""
    return ScoreBatch(
        prompts=[text for text in prompts for _ in range(group_size)],
        completions=completions,
        columns=metadata_columns(records, group_size),
        completion_ids=[tuple(ids) for ids in completion_ids],  # rows read-only, shared by every source
        policy_lengths=list(policy_lengths),
        group_size=group_size,
        step=step,
        prompt_messages=([r["prompt"] for r in records for _ in range(group_size)]
                         if records and all(is_conversational(r) for r in records) else []),
        completion_messages=list(episodes.messages) if episodes is not None else [],
        environments=episodes.states if episodes is not None else [],
    )


def to_matrix(raw: Any, bound: BoundReward, n: int) -> torch.Tensor:
    """Check a source's return value and turn it into an ``(n, len(objectives))`` float64 tensor."""
    k = len(bound.objectives)
    if isinstance(raw, Mapping):
        missing = [o for o in bound.objectives if o not in raw]
        extra = [key for key in raw if key not in bound.objectives]
        if missing or extra:
            raise RewardError(
                f"{bound.label} returned objectives {sorted(raw)}; expected exactly {bound.objectives}"
            )
        return torch.stack([_column(raw[o], bound, n, o) for o in bound.objectives], dim=1)
    if isinstance(raw, torch.Tensor) and raw.dim() == 2:
        if tuple(raw.shape) != (n, k):
            raise RewardError(
                f"{bound.label} returned a tensor of shape {tuple(raw.shape)}; expected ({n}, {k}): one row per "
                f"completion, one column per objective"
            )
        return torch.stack([_column(raw[:, j], bound, n, o) for j, o in enumerate(bound.objectives)], dim=1)
    if k != 1:
        raise RewardError(
            f"{bound.label} declares objectives {bound.objectives} but returned a flat list; return "
            f"{{objective: scores}} or an ({n}, {k}) tensor"
        )
    return _column(raw, bound, n, bound.objectives[0]).unsqueeze(1)


def _column(values: Any, bound: BoundReward, n: int, objective: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).reshape(-1).tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (str, bytes)):
        values = values.tolist()  # numpy arrays
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(
            f"{bound.label} returned a {type(values).__name__}; it must return one score per completion "
            f"(a list of {n} numbers)"
        )
    if len(values) != n:
        raise RewardError(
            f"{bound.label} returned {len(values)} scores for {n} completions; it must return one score per completion"
        )
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float)):
            try:
                if isinstance(v, (str, bytes)):  # "0.5" is a bug in the reward, not a score to convert
                    raise TypeError
                v = float(v)  # numpy scalars, 0-d tensors
            except (TypeError, ValueError):
                raise RewardError(
                    f"{bound.label} returned {type(v).__name__} {v!r} for completion {i} of objective "
                    f"'{objective}'; scores must be numbers (NaN or None to abstain)"
                ) from None
        if math.isinf(v):
            raise RewardError(
                f"{bound.label} returned {v} for completion {i} of objective '{objective}'; scores must be "
                f"finite (NaN or None to abstain)"
            )
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float64)
