"""REINFORCE leave-one-out (RLOO) advantages.

    A_i = r_i - (1 / (n - 1)) * sum_{j != i} r_j  =  n / (n - 1) * (r_i - mean_G)

Each completion's baseline is the mean of the *other* completions of its prompt, so the baseline
does not depend on the completion itself. Source: Ahmadian et al., "Back to Basics: Revisiting
REINFORCE Style Optimization for Learning from Human Feedback", arXiv 2402.14740.
"""

import torch

from zenalign import hookimpl
from zenalign.plugins import NormalizerType, Options, combine_objectives, finish, valid_count


class LeaveOneOut:
    """r_i minus the mean reward of the other completions in the group."""

    def __call__(self, rewards, objectives):
        r = combine_objectives(rewards, objectives.weights)  # (P, G)
        n = valid_count(r).to(r.dtype)
        total = torch.nansum(r, dim=1, keepdim=True)
        baseline = (total - r) / (n - 1).clamp(min=1)
        advantages = torch.where(n >= 2, r - baseline, torch.zeros_like(r))
        return finish(advantages, r)


@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("rloo", Options, LeaveOneOut)]
