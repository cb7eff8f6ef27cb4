"""Partial credit for the reverse task: the share of positions where the completion agrees with
the reference answer ("tzqk" vs "tzkq" scores 0.5). A denser signal than exact match.

Load it from a recipe with `plugins: [examples/position_match.py]`.
"""

from pydantic import Field

from zenalign import Options, RewardSourceType, hookimpl


class PositionMatchOptions(Options):
    answer_field: str = Field("answer", description="Prompt-record field holding the reference answer.")


class PositionMatch:
    """Share of positions where completion and reference answer agree."""

    def __init__(self, options: PositionMatchOptions):
        self.answer_field = options.answer_field

    def score(self, batch):
        scores = []
        for completion, answer in zip(batch.completions, batch.columns[self.answer_field]):
            completion = completion.strip()
            width = max(len(completion), len(answer))
            same = sum(a == b for a, b in zip(completion, answer))
            scores.append(same / width if width else 1.0)
        return scores


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("position_match", PositionMatchOptions, PositionMatch)]
