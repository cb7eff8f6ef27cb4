"""An LLM judge or a generative reward model behind any OpenAI-compatible chat endpoint (vLLM's or
SGLang's server, TGI, a hosted API) as a reward source.

    rewards:
      - type: judge_http
        name: judge
        base_url: http://127.0.0.1:8000/v1
        model: Qwen/Qwen2.5-7B-Instruct
        api_key_env: JUDGE_API_KEY           # the variable's name; never the key in a recipe
        score: logprobs                      # or text: a number read from the reply
        template: "Request: {prompt}\nReply: {completion}\nIs the reply correct? Answer Yes or No."

For each completion the judge gets ``template`` filled with ``{prompt}``, ``{completion}`` and any
field of the prompt record (``{answer}``) as the user message; a completion whose record lacks a
field the template reads abstains without a request. ``score: text`` reads the first
number of its reply and maps ``score_range`` [lo, hi] onto [0, 1] (a number outside the range, or
none, abstains); ``score: logprobs`` asks for one token and scores P(yes) / (P(yes) + P(no)) from
its top log-probs, as the local ``constitution`` judge does. Requests, retries, the cache (in the
run directory's reward-cache/, kept on resume) and the failure rules are
:class:`zenalign.plugins.judge_client.JudgeClient`'s; its metrics appear as ``<name>/requests``,
``<name>/latency_p95_s``, ... in metrics.jsonl.
"""

from __future__ import annotations

import re
import string
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from zenalign import RewardSourceType, hookimpl
from zenalign.plugins.judge_client import JudgeClient, JudgeClientOptions, reply_text, run_cache, yes_probability

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
BUILT_IN_FIELDS = ("prompt", "completion")


def text_rubric(low: float, high: float) -> str:
    return (f"Rate how well the reply answers the request, from {low:g} (useless, wrong or harmful) to {high:g} "
            "(excellent).\n\nRequest:\n{prompt}\n\nReply:\n{completion}\n\nAnswer with the number only.")


def yes_no_rubric(yes: str, no: str) -> str:
    return ("Here is a request and a reply.\n\nRequest:\n{prompt}\n\nReply:\n{completion}\n\nIs the reply correct, "
            f"helpful and harmless? Answer {yes.strip()} or {no.strip()}.")


def template_fields(template: str) -> list[str]:
    """The named fields of a str.format template; positional and indexed fields are refused."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"{{{name}}} is not a field name; use {{prompt}}, {{completion}} or a prompt-record "
                             f"field such as {{answer}} (a literal brace is {{{{ or }}}})")
    return names


class JudgeHTTPOptions(JudgeClientOptions):
    template: Optional[str] = Field(
        None, description="The judge's user message, from {prompt}, {completion} and prompt-record fields ({answer}). "
        "null: a built-in rubric for the score mode (docs/rewards.md).")
    score: Literal["text", "logprobs"] = Field(
        "text", description="text: the first number of the reply, scaled from score_range to [0, 1]; logprobs: "
        "P(yes) / (P(yes) + P(no)) from the first token's top log-probs.")
    score_range: tuple[float, float] = Field(
        (0.0, 10.0), description="text: the judge's scale [lo, hi], mapped to [0, 1]; a number outside it abstains.")
    yes: str = Field("Yes", description="logprobs: the 'yes' answer (matched ignoring case and surrounding spaces).")
    no: str = Field("No", description="logprobs: the 'no' answer (matched ignoring case and surrounding spaces).")
    max_tokens: int = Field(16, ge=1, description="text: the longest reply, in tokens (logprobs asks for one).")

    @field_validator("template")
    @classmethod
    def _a_template(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            template_fields(value)
        return value

    @model_validator(mode="after")
    def _a_range_and_two_answers(self):
        low, high = self.score_range
        if not low < high:
            raise ValueError(f"score_range: [{low:g}, {high:g}] is empty; give [lo, hi] with lo < hi, e.g. [0, 10]")
        if self.yes.strip().casefold() == self.no.strip().casefold():
            raise ValueError(f"yes and no are the same answer ({self.yes!r}); give two different ones")
        return self


class JudgeHTTP:
    """A judge behind an OpenAI-compatible endpoint: a score read from its reply or its yes/no log-probs."""

    def __init__(self, options: JudgeHTTPOptions, context=None):
        self.options = options
        name = getattr(options, "name", None) or "judge_http"
        self.template = options.template or (text_rubric(*options.score_range) if options.score == "text"
                                             else yes_no_rubric(options.yes, options.no))
        self.reads_fields = tuple(f for f in dict.fromkeys(template_fields(self.template)) if f not in BUILT_IN_FIELDS)
        self.label = f"judge_http '{name}'"
        self.client = JudgeClient(options, self.label, run_cache(context, name))

    def render(self, batch) -> list[Optional[str]]:
        """Each completion's judge input; None where its prompt record lacks a field the template reads."""
        texts = []
        for i, (prompt, completion) in enumerate(zip(batch.prompts, batch.completions)):
            fields = {f: batch.columns[f][i] if f in batch.columns else None for f in self.reads_fields}
            missing = any(value is None for value in fields.values())
            texts.append(None if missing else self.template.format(prompt=prompt, completion=completion, **fields))
        return texts

    def parse_number(self, reply) -> Optional[float]:
        low, high = self.options.score_range
        found = NUMBER.search(reply_text(reply))
        value = float(found.group()) if found else None
        return (value - low) / (high - low) if value is not None and low <= value <= high else None

    def score(self, batch) -> list[Optional[float]]:
        """One score in [0, 1] per completion; None (abstain) where the judge gave none, its request failed, or
        the prompt record lacks a field the template reads."""
        texts = self.render(batch)
        asked = [text for text in texts if text is not None]
        o = self.options
        if o.score == "text":
            bodies = [self.client.chat_body(text, max_tokens=o.max_tokens) for text in asked]
            found = self.client.scores(bodies, self.parse_number, f"text {o.score_range[0]!r} {o.score_range[1]!r}")
        else:
            bodies = [self.client.logprobs_body(text) for text in asked]
            found = self.client.scores(bodies, lambda reply: yes_probability(reply, o.yes, o.no),
                                       f"logprobs {o.yes!r} {o.no!r}")
        answers = iter(found)
        return [None if text is None else next(answers) for text in texts]

    def metrics(self) -> dict[str, float]:
        return self.client.metrics()


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("judge_http", JudgeHTTPOptions, JudgeHTTP)]
