"""Built-in rollout filters: DAPO's dynamic sampling and overlong reward shaping, and masking
truncated completions out of the loss.

Each is a ``RolloutFilterType`` listed in the recipe's ``filters: [{type: NAME, ...}]``. A filter
gets the step's scored groups (``RolloutGroups``, the global batch) and returns them changed with
``dataclasses.replace``; filters run in the order listed, so put ``overlong_shaping`` before
``dynamic_sampling`` when the shaped reward should decide which groups are informative.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from pydantic import Field

from zenalign import hookimpl
from zenalign.errors import RecipeError
from zenalign.plugins import Objectives, Options, RolloutFilterType, RolloutGroups, zero_variance


class DynamicSamplingOptions(Options):
    max_extra_rounds: int = Field(3, ge=0, description="At most this many more batches of grpo.prompts_per_step prompts "
                                  "are sampled per step to replace dropped groups. If the batch is still short, the "
                                  "earliest dropped groups fill it with no weight in the loss.")


class DynamicSampling:
    """DAPO's dynamic sampling (arXiv 2503.14476, section 3.2): drop every group whose rewards are
    all equal on every objective with a non-zero weight (all correct or all wrong: zero advantage
    under group normalizers, so no gradient), and keep sampling prompts until the step has
    ``grpo.prompts_per_step`` informative groups or ``max_extra_rounds`` more rounds were drawn.
    Abstentions (NaN) are left out of the comparison."""

    def __init__(self, options: DynamicSamplingOptions, context):
        if context.recipe.sampling.group_size < 2:
            raise RecipeError(f"needs sampling.group_size >= 2 (got {context.recipe.sampling.group_size}): a group of "
                              f"one completion always has equal rewards, so every group would be dropped")
        self.max_extra_rounds = options.max_extra_rounds

    def __call__(self, groups: RolloutGroups, objectives: Objectives) -> RolloutGroups:
        weighted = [k for k in range(groups.rewards.shape[-1]) if float(objectives.weights[k]) != 0.0]
        weighted = weighted or list(range(groups.rewards.shape[-1]))
        flat = torch.stack([zero_variance(groups.rewards[..., k]).squeeze(1)  # (P, K') per weighted objective
                            for k in weighted], dim=1)
        return replace(groups, keep=groups.keep & ~flat.all(dim=1))


class OverlongShapingOptions(Options):
    cache_length: int = Field(..., gt=0, description="L_cache: the penalty ramps from 0 to -penalty over the last "
                              "cache_length tokens before sampling.max_new_tokens (DAPO uses 4096 of 20480).")
    penalty: float = Field(1.0, gt=0.0, description="The penalty at max_new_tokens (DAPO: 1).")
    objective: Optional[str] = Field(None, description="The objective the penalty is added to; null: the first one.")


class OverlongShaping:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to one objective's reward.
    With L_max = sampling.max_new_tokens, L_cache = cache_length and |y| the completion's tokens
    (with its EOS, as verl's DAPO counts them):

        R(y) = 0                                   if |y| <= L_max - L_cache
        R(y) = penalty * ((L_max - L_cache) - |y|) / L_cache   otherwise (-penalty at |y| = L_max)

    A completion that abstained on the objective stays an abstention."""

    def __init__(self, options: OverlongShapingOptions, context):
        max_new_tokens = context.recipe.sampling.max_new_tokens
        if options.cache_length >= max_new_tokens:
            raise RecipeError(f"cache_length ({options.cache_length}) must be below sampling.max_new_tokens "
                              f"({max_new_tokens}): the penalty ramps over the last cache_length tokens")
        self.cache_length, self.penalty, self.objective = options.cache_length, options.penalty, options.objective

    def __call__(self, groups: RolloutGroups, objectives: Objectives) -> RolloutGroups:
        if self.objective is not None and self.objective not in objectives.names:
            raise RecipeError(f"objective '{self.objective}' is not produced by any reward source; "
                              f"produced: {', '.join(objectives.names)}")
        k = 0 if self.objective is None else objectives.names.index(self.objective)
        start = groups.max_new_tokens - self.cache_length
        over = (groups.lengths - start).clamp(min=0).to(groups.rewards.dtype)       # (P, G) tokens into the cache
        rewards = groups.rewards.clone()
        rewards[..., k] -= self.penalty * over / self.cache_length
        return replace(groups, rewards=rewards)


class MaskTruncated:
    """Completions that hit sampling.max_new_tokens without an EOS get no weight in the loss
    (DAPO's overlong filtering, TRL's mask_truncated_completions). They still count in their
    group's reward statistics, and with grpo's per-completion mean still in the number of
    completions the loss averages over."""

    def __call__(self, groups: RolloutGroups, objectives: Objectives) -> RolloutGroups:
        return replace(groups, loss_mask=groups.loss_mask & ~groups.truncated)


@hookimpl
def zenalign_rollout_filter_types():
    return [
        RolloutFilterType("dynamic_sampling", DynamicSamplingOptions, DynamicSampling,
                          description="DAPO: drop groups whose rewards are all equal and sample more prompts to "
                          "refill the batch (arXiv 2503.14476)."),
        RolloutFilterType("overlong_shaping", OverlongShapingOptions, OverlongShaping,
                          description="DAPO: a reward penalty ramping over the last cache_length tokens before "
                          "max_new_tokens (arXiv 2503.14476)."),
        RolloutFilterType("mask_truncated", Options, MaskTruncated,
                          description="Completions cut at max_new_tokens get no weight in the loss."),
    ]
