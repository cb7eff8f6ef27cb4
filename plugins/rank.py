"""Tie-aware rank advantages.

    rank_i = |{j : r_j > r_i}| + 1            (ties share a rank: competition ranking "1224")
    A_i    = (mean_rank - rank_i) / (n - 1)

Ranks are centred so advantages sum to zero within each group; dividing by n - 1 keeps them in
[-1, 1] whatever the group size. Only the order of rewards matters, so outliers and reward scale
cannot dominate. Abstaining completions (NaN) are not ranked and get 0.
"""

import torch

from zenalign import hookimpl
from zenalign.plugins import NormalizerType, Options, combine_objectives, finish, valid_count


class Rank:
    """Centred rank within the group; ties share a rank."""

    def __call__(self, rewards, objectives):
        r = combine_objectives(rewards, objectives.weights)  # (P, G)
        valid = ~torch.isnan(r)
        beats = (r.unsqueeze(1) > r.unsqueeze(2)) & valid.unsqueeze(1)  # [p, i, j]: r_j > r_i
        rank = 1.0 + beats.sum(-1).to(r.dtype)  # (P, G)
        n = valid_count(r).to(r.dtype)
        mean_rank = torch.where(valid, rank, torch.zeros_like(rank)).sum(1, keepdim=True) / n.clamp(min=1)
        advantages = (mean_rank - rank) / (n - 1).clamp(min=1)
        return finish(advantages, r)


@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("rank", Options, Rank)]
