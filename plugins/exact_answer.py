"""Exact-answer verifier: 1.0 when the completion's answer equals the prompt's reference answer.

The reference comes from a field of the prompt record (``answer`` by default) and may be one
string or a list of accepted strings; a record without a reference makes the verifier abstain.
With ``extract``, the answer is the last match of a regular expression in the completion (its
first group if it has one), e.g. ``"####\\s*(\\S+)"`` or ``"\\\\boxed\\{([^}]*)\\}"``.
"""

import math
import re
from typing import Optional

from pydantic import Field, field_validator

from zenalign import hookimpl
from zenalign.errors import RewardError
from zenalign.plugins import Options, RewardSourceType, valid_regex


class ExactAnswerOptions(Options):
    answer_field: str = Field("answer", description="Prompt-record field holding the reference answer(s).")
    extract: Optional[str] = Field(
        None, description="Regex whose last match (first group, if any) is taken as the answer; null = whole completion."
    )
    strip: bool = Field(True, description="Ignore leading and trailing whitespace.")
    case_sensitive: bool = Field(True, description="Compare letters case-sensitively.")
    numeric: bool = Field(False, description="When both sides parse as numbers, compare them as numbers (3.0 == 3).")
    correct_score: float = Field(1.0, description="Score of a correct answer.")
    wrong_score: float = Field(0.0, description="Score of a wrong (or unextractable) answer.")

    _compiles = field_validator("extract")(valid_regex)


class ExactAnswer:
    """1.0 if the completion's answer equals the reference answer, else 0.0."""

    def __init__(self, options: ExactAnswerOptions):
        self.options = options
        self.pattern = re.compile(options.extract) if options.extract else None
        self.reads_fields = (options.answer_field,)  # records without it: abstain (warned about at start)

    def _normalize(self, text: str) -> str:
        text = text.strip() if self.options.strip else text
        return text if self.options.case_sensitive else text.casefold()

    def _answer(self, completion: str):
        if self.pattern is None:
            return completion
        matches = list(self.pattern.finditer(completion))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if last.groups() else last.group(0)

    def _equal(self, got: str, want: str) -> bool:
        got, want = self._normalize(got), self._normalize(str(want))
        if got == want:
            return True
        if self.options.numeric:
            try:
                return math.isclose(float(got), float(want), rel_tol=0, abs_tol=1e-9)
            except ValueError:
                return False
        return False

    def score(self, batch):
        field = self.options.answer_field
        if field not in batch.columns:
            raise RewardError(
                f"exact_answer: prompt records have no field '{field}' (answer_field); fields: "
                f"{', '.join(sorted(batch.columns)) or 'none'}"
            )
        scores = []
        for completion, reference in zip(batch.completions, batch.columns[field]):
            if reference is None:
                scores.append(None)
                continue
            accepted = reference if isinstance(reference, (list, tuple)) else [reference]
            got = self._answer(completion)
            ok = got is not None and any(self._equal(got, want) for want in accepted)
            scores.append(self.options.correct_score if ok else self.options.wrong_score)
        return scores


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("exact_answer", ExactAnswerOptions, ExactAnswer)]
