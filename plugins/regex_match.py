"""Regex match reward: one score when the completion matches a pattern, another when it does not.

Typical use: a format reward (``pattern: "^<answer>.*</answer>$"``, ``mode: fullmatch``).
"""

import re
from typing import Literal

from pydantic import Field, field_validator

from zenalign import hookimpl
from zenalign.plugins import Options, RewardSourceType, valid_regex

FLAGS = {"IGNORECASE": re.IGNORECASE, "MULTILINE": re.MULTILINE, "DOTALL": re.DOTALL}


class RegexMatchOptions(Options):
    pattern: str = Field(description="Python regular expression.")
    mode: Literal["search", "fullmatch", "match"] = Field(
        "search", description="search: anywhere; match: at the start; fullmatch: the whole completion."
    )
    flags: list[Literal["IGNORECASE", "MULTILINE", "DOTALL"]] = Field(default_factory=list, description="re flags.")
    match_score: float = Field(1.0, description="Score when the pattern matches.")
    miss_score: float = Field(0.0, description="Score when it does not.")

    _compiles = field_validator("pattern")(valid_regex)


class RegexMatch:
    """match_score if the completion matches `pattern`, else miss_score."""

    def __init__(self, options: RegexMatchOptions):
        flags = 0
        for name in options.flags:
            flags |= FLAGS[name]
        regex = re.compile(options.pattern, flags)
        self.test = getattr(regex, options.mode)
        self.options = options

    def score(self, batch):
        hit, miss = self.options.match_score, self.options.miss_score
        return [hit if self.test(c) else miss for c in batch.completions]


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("regex_match", RegexMatchOptions, RegexMatch)]
