"""Length reward: prefer shorter or longer completions, or a target length.

    prefer: shorter  ->  r = -scale * L
    prefer: longer   ->  r =  scale * L
    target: T        ->  r = -scale * |L - T|

L counts tokens (EOS excluded) or characters. In an episode, tokens counts only the tokens the policy
sampled (``ScoreBatch.policy_lengths``), not a tool's or an environment's; chars counts the
completion text as the episode gives it. Group normalizers are invariant to ``scale``; it
matters when this objective is combined with others by weight.
"""

from typing import Literal, Optional

from pydantic import Field

from zenalign import hookimpl
from zenalign.plugins import Options, RewardSourceType


class LengthOptions(Options):
    unit: Literal["tokens", "chars"] = Field("tokens", description="Count completion tokens or characters.")
    prefer: Literal["shorter", "longer"] = Field("shorter", description="Direction, when no target is set.")
    target: Optional[int] = Field(None, ge=0, description="Target length; the reward falls with the distance to it.")
    scale: float = Field(1.0, gt=0, description="Multiplies the reward.")


class LengthReward:
    """Reward by completion length."""

    def __init__(self, options: LengthOptions):
        self.options = options

    def score(self, batch):
        o = self.options
        if o.unit == "tokens":
            lengths = batch.policy_lengths or [len(ids) for ids in batch.completion_ids]
        else:
            lengths = [len(c) for c in batch.completions]
        if o.target is not None:
            return [-o.scale * abs(n - o.target) for n in lengths]
        sign = 1.0 if o.prefer == "longer" else -1.0
        return [sign * o.scale * n for n in lengths]


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("length", LengthOptions, LengthReward)]
