"""Normalize each objective, then sum (GDPO).

    Z_k  = (r_k - mean_G(r_k)) / (std_G(r_k) + eps)     each objective within its group
    S    = sum_k w_k * Z_k                               weighted sum
    A    = S / (std_B(S) + eps)                          renormalised over the whole batch

S already sums to zero within every group, so its batch mean is zero and the batch step is a
rescaling; it does not re-centre, which would give groups without any signal a non-zero advantage
when some completions abstain.
Summing raw rewards before normalising lets the objective with the largest variance dominate and
maps distinct reward vectors onto the same advantage; normalising each objective first keeps them
apart, and the batch renormalisation keeps the scale from growing with the number of objectives.
Source: Liu et al., "GDPO: Group reward-Decoupled Normalization Policy Optimization for
Multi-reward RL Optimization", arXiv 2601.05242.
"""

import torch
from pydantic import Field

from zenalign import hookimpl
from zenalign.plugins import NormalizerType, Options, all_abstain, finish, nan_std, standardize_objectives, weighted_sum, zero_variance


class NormalizeThenSumOptions(Options):
    eps: float = Field(1e-6, gt=0, description="Added to every std before dividing.")
    unbiased_std: bool = Field(True, description="Divide variances by n - 1 instead of n.")


class NormalizeThenSum:
    """Per-objective group z-score, weighted sum, batch z-score (GDPO)."""

    def __init__(self, options: NormalizeThenSumOptions):
        self.options = options

    def __call__(self, rewards, objectives):
        o = self.options
        summed = weighted_sum(standardize_objectives(rewards, o.eps, o.unbiased_std), objectives.weights)  # (P, G)
        summed = summed.masked_fill(all_abstain(rewards), float("nan"))
        flat = summed.reshape(1, -1)
        if bool(zero_variance(flat).item()):
            return torch.zeros_like(summed)
        advantages = summed / (nan_std(flat, unbiased=o.unbiased_std) + o.eps)
        return finish(advantages, summed)


@hookimpl
def zenalign_normalizer_types():
    return [
        NormalizerType("normalize_then_sum", NormalizeThenSumOptions, NormalizeThenSum),
        NormalizerType("gdpo", NormalizeThenSumOptions, NormalizeThenSum, description="GDPO; same as normalize_then_sum."),
    ]
