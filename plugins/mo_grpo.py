"""MO-GRPO: normalize each objective within its group, then take the weighted sum.

    A = sum_k w_k * (r_k - mean_G(r_k)) / (std_G(r_k) + eps)

Every objective contributes on the same scale whatever the spread of its raw values, so none can
dominate (or be "hacked" at the others' expense) just by having the larger variance. Unlike GDPO
there is no batch renormalisation afterwards. Source: Ichihara et al., "MO-GRPO: Mitigating Reward
Hacking of Group Relative Policy Optimization on Multi-Objective Problems", arXiv 2509.22047.
"""

from pydantic import Field

from zenalign import hookimpl
from zenalign.plugins import NormalizerType, Options, all_abstain, standardize_objectives, weighted_sum


class MOGRPOOptions(Options):
    eps: float = Field(1e-6, gt=0, description="Added to every group std before dividing.")
    unbiased_std: bool = Field(True, description="Divide variances by n - 1 instead of n.")


class MOGRPO:
    """Per-objective group z-score, then weighted sum."""

    def __init__(self, options: MOGRPOOptions):
        self.options = options

    def __call__(self, rewards, objectives):
        z = standardize_objectives(rewards, self.options.eps, self.options.unbiased_std)  # (P, G, K)
        return weighted_sum(z, objectives.weights).masked_fill(all_abstain(rewards), 0.0)


@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("mo_grpo", MOGRPOOptions, MOGRPO)]
