"""Mean-only advantages (Dr. GRPO).

    A_i = r_i - mean_G

No division by the group std, which Liu et al. show biases updates towards groups that are
nearly all right or all wrong. Pair it with ``loss: {type: grpo, aggregation: dr_grpo}`` to also remove the
length bias. Source: "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783.
"""

from zenalign import hookimpl
from zenalign.plugins import NormalizerType, Options, combine_objectives, finish, nan_mean


class MeanOnly:
    """r - group mean, no std normalisation (Dr. GRPO)."""

    def __call__(self, rewards, objectives):
        r = combine_objectives(rewards, objectives.weights)  # (P, G)
        return finish(r - nan_mean(r), r)


@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("dr_grpo", Options, MeanOnly)]
