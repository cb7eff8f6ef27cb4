"""The filter phase: rollout filters between scoring and normalizing, and the choice of the groups
a step trains on when filters drop some.

Filters see the global batch as :class:`~zenalign.plugins.RolloutGroups` (every process sees the
same, so every process makes the same choice) and run in the order the recipe lists them. What a
filter returns is checked here; a filter that breaks a shape or writes an infinite reward is an
error that names it. Nothing here names a filter; the built-ins are plugins in ``plugins/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from zenalign.errors import PluginError, one_line
from zenalign.plugins import Objectives, RefillsGroups, RolloutGroups


def apply_filters(filters: Sequence[tuple[str, Any]], groups: RolloutGroups, objectives: Objectives) -> RolloutGroups:
    """Run each ``(name, filter)`` on ``groups`` in turn and check what it returns."""
    for name, rollout_filter in filters:
        try:
            out = rollout_filter(groups, objectives)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"rollout filter '{name}' raised {type(exc).__name__}: {one_line(exc)} "
                              f"(at step {groups.step})") from exc
        check_groups(name, out, groups)
        groups = out
    return groups


def check_groups(name: str, out: Any, before: RolloutGroups) -> None:
    if not isinstance(out, RolloutGroups):
        raise PluginError(f"rollout filter '{name}' returned {type(out).__name__}; it must return the RolloutGroups "
                          f"it was given, changed with dataclasses.replace")
    p, g = before.loss_mask.shape
    for field, shape, dtype in (("rewards", tuple(before.rewards.shape), None), ("keep", (p,), torch.bool),
                                ("loss_mask", (p, g), torch.bool)):
        value = getattr(out, field)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or (dtype and value.dtype != dtype):
            raise PluginError(f"rollout filter '{name}' returned {field} of shape {tuple(getattr(value, 'shape', ()))} "
                              f"and dtype {getattr(value, 'dtype', type(value).__name__)}; expected {shape}"
                              f"{' ' + str(dtype) if dtype else ''}")
    if torch.isinf(out.rewards).any():
        raise PluginError(f"rollout filter '{name}' made rewards infinite; rewards must stay finite (NaN abstains)")


def extra_rounds(filters: Sequence[tuple[str, Any]]) -> int:
    """How many more rounds of prompts a step may draw to replace dropped groups: the largest
    ``max_extra_rounds`` of the filters that refill (:class:`~zenalign.plugins.RefillsGroups`)."""
    return max([int(f.max_extra_rounds) for _, f in filters if isinstance(f, RefillsGroups)], default=0)


@dataclass
class Selection:
    """The groups a step trains on, as ``(round, group)`` pairs in draw order, and which of them a
    filter dropped (they fill the batch when too few were kept; they never reach the loss)."""

    chosen: list[tuple[int, int]]
    dropped: list[bool]

    @property
    def is_first_round(self) -> bool:
        """Exactly the first round's groups, in order: the sampled batch can be used as it is."""
        return all(pair == (0, i) for i, pair in enumerate(self.chosen))


def select_groups(keeps: Sequence[torch.Tensor], target: int) -> Selection:
    """The first ``target`` kept groups over the rounds' ``(P,)`` keep masks, in draw order; if
    fewer were kept, the earliest dropped groups make up the rest, so every step trains on
    ``target`` groups (the same batch shape on every process)."""
    kept = [(r, i) for r, keep in enumerate(keeps) for i in range(len(keep)) if bool(keep[i])][:target]
    short = target - len(kept)
    fill = [(r, i) for r, keep in enumerate(keeps) for i in range(len(keep)) if not bool(keep[i])][:short]
    chosen = sorted(kept + fill)
    fill_set = set(fill)
    return Selection(chosen, [pair in fill_set for pair in chosen])
