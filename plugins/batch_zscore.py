"""Batch z-score advantages.

    A_i = (r_i - center_i) / (std_B + eps)

std_B is the standard deviation of every reward in the (global) batch. ``center: batch`` subtracts
the batch mean (REINFORCE++, arXiv 2501.03262); ``center: group`` subtracts the group mean and
only the scale comes from the batch ("group mean, batch std", Liu et al., arXiv 2508.08221), which
keeps the group baseline but avoids inflating near-constant groups.
"""

from typing import Literal

import torch
from pydantic import Field

from zenalign import hookimpl
from zenalign.plugins import NormalizerType, Options, combine_objectives, finish, nan_mean, nan_std, zero_variance


class BatchZScoreOptions(Options):
    center: Literal["batch", "group"] = Field(
        "batch", description="Subtract the batch mean (batch) or each group's own mean (group)."
    )
    eps: float = Field(1e-6, gt=0, description="Added to the batch std before dividing.")
    unbiased_std: bool = Field(True, description="Divide the variance by n - 1 instead of n.")


class BatchZScore:
    """Rewards standardised with batch statistics."""

    def __init__(self, options: BatchZScoreOptions):
        self.options = options

    def __call__(self, rewards, objectives):
        r = combine_objectives(rewards, objectives.weights)  # (P, G)
        flat = r.reshape(1, -1)
        std = nan_std(flat, unbiased=self.options.unbiased_std)  # (1, 1)
        center = nan_mean(flat) if self.options.center == "batch" else nan_mean(r)
        advantages = (r - center) / (std + self.options.eps)
        if bool(zero_variance(flat).item()):
            advantages = torch.zeros_like(r)
        return finish(advantages, r)


@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("batch_zscore", BatchZScoreOptions, BatchZScore)]
