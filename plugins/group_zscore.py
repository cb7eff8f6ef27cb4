"""Group z-score advantages, the GRPO paper's normalizer (the default).

    A_i = (r_i - mean_G) / (std_G + eps)

mean and std are taken over the completions of one prompt that did not abstain; a group whose
rewards are all equal gets all-zero advantages. Several objectives are first combined into one
reward by their weights (``zenalign.advantages.combine_objectives``).
Source: Shao et al., DeepSeekMath, arXiv 2402.03300, section 4.1.2 (outcome supervision).
"""

from pydantic import Field

from zenalign import hookimpl
from zenalign.plugins import NormalizerType, Options, combine_objectives, standardize_groups


class GroupZScoreOptions(Options):
    eps: float = Field(1e-6, gt=0, description="Added to the group std before dividing.")
    unbiased_std: bool = Field(
        True, description="Divide the variance by n - 1 (as torch.std, TRL and verl do) instead of n."
    )


class GroupZScore:
    """Group z-score: (r - group mean) / (group std + eps)."""

    def __init__(self, options: GroupZScoreOptions):
        self.options = options

    def __call__(self, rewards, objectives):
        combined = combine_objectives(rewards, objectives.weights)  # (P, G)
        return standardize_groups(combined, self.options.eps, self.options.unbiased_std)


@hookimpl
def zenalign_normalizer_types():
    return [
        NormalizerType("group_zscore", GroupZScoreOptions, GroupZScore, default=True),
        # The multi-objective name for the same computation: sum the weighted objectives first,
        # then normalise within the group (plain GRPO on a scalarised reward).
        NormalizerType("sum_then_normalize", GroupZScoreOptions, GroupZScore,
                       description="Weighted sum of objectives, then group z-score (plain GRPO); same as group_zscore."),
    ]
