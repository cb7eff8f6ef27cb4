"""Constitutional rewards: principles judged by a local causal LM, each principle an objective.

    rewards:
      - type: constitution
        judge: models/hhh-judge
        principles:
          - {name: harmless, text: "decline harmful requests"}
          - {name: honest, text: "never invent an answer"}
        # or principles_file: principles.yaml (a list in the same form)

For every completion and principle the judge reads ``template`` (with {prompt}, {completion} and
{principle}) and the score is the judge's next-token preference for ``yes`` over ``no``:

    score = P(yes) / (P(yes) + P(no)) = sigmoid(logit_yes - logit_no)

from one batched forward pass, no generation. ``yes`` and ``no`` must each be a single token of
the judge's tokenizer. With ``remote: {base_url, model, ...}`` instead of ``judge``, the judge is
a model behind an OpenAI-compatible server (vLLM, SGLang, a hosted API): each template is sent as
a user message asking for one token, and P(yes), P(no) come from that token's top log-probs
(``yes``/``no`` matched ignoring case and surrounding spaces; abstains when neither is among
them), with judge_http's retries, concurrency limit and cache. Each principle is its own
objective, so weights, constraints and every multi-objective normalizer apply to principles. Source: Bai et al., "Constitutional AI",
arXiv 2212.08073 (here the AI feedback is a probability rather than a sampled choice).
"""

import math
from pathlib import Path
from typing import Optional, Union

import torch
from pydantic import Field, model_validator

from zenalign import Options, RewardSourceType, hookimpl
from zenalign.errors import RecipeError
from zenalign.models.primitives import accepts_logits_to_keep
from zenalign.models.loading import load_causal_lm, load_tokenizer
from zenalign.plugins.judge_client import JudgeClient, JudgeClientOptions, run_cache, yes_probability
from zenalign.recipe.principles import Principle, load_principles


class ConstitutionOptions(Options):
    judge: Optional[str] = Field(None, description="Local causal-LM directory of the judge (relative to the recipe); "
                                                   "or give remote.")
    remote: Optional[JudgeClientOptions] = Field(
        None, description="A judge behind an OpenAI-compatible server instead of a local one: {base_url, model, ...} "
        "as for judge_http; P(yes) and P(no) come from the first reply token's top log-probs.")
    principles: list[Union[str, Principle]] = Field(
        default_factory=list, description="Principles: strings (named principle_1, ...) or {name, text}."
    )
    principles_file: Optional[str] = Field(None, description="YAML or text file of principles (one per line in text).")
    template: str = Field(
        "{prompt}{completion}\nprinciple: {principle}\nfollowed? ",
        description="Judge input made from {prompt}, {completion} and {principle}; the next token is yes or no.",
    )
    yes: str = Field(" yes", description="The 'yes' string; one token of a local judge's tokenizer (remote: matched "
                                         "ignoring case and surrounding spaces).")
    no: str = Field(" no", description="The 'no' string; one token of a local judge's tokenizer (remote: matched "
                                       "ignoring case and surrounding spaces).")
    batch_size: int = Field(64, ge=1, description="Judge inputs per forward pass.")
    max_length: int = Field(1024, ge=8, description="Truncate judge inputs (from the left) to this many tokens.")
    trust_remote_code: bool = Field(False, description="Allow model code shipped in the judge directory to run.")

    @model_validator(mode="after")
    def _one_judge(self):
        if (self.judge is None) == (self.remote is None):
            raise ValueError("give exactly one judge: judge (a local directory) or remote ({base_url, model, ...})")
        return self


def single_token(tokenizer, text: str, field: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise RecipeError(
            f"constitution.{field}: {text!r} is {len(ids)} tokens in the judge's tokenizer ({ids}); it must be exactly "
            f"one (try a leading space, another spelling, or a single letter such as 'y'/'n')"
        )
    return ids[0]


class Constitution:
    """One objective per principle: P(yes) / (P(yes) + P(no)) from a judge's next token."""

    def __init__(self, options: ConstitutionOptions, context=None):
        self.options = options
        base = context.base_dir if context is not None else Path.cwd()
        self.principles = load_principles(options.principles, options.principles_file, base, where="constitution.principles")
        self.objectives = [p.name for p in self.principles]
        self.remote = None
        if options.remote is not None:
            name = getattr(options, "name", None) or "constitution"
            self.remote = JudgeClient(options.remote, f"constitution '{name}'", run_cache(context, name))
            return
        path = context.resolve_path(options.judge) if context is not None else Path(options.judge)
        self.judge = load_causal_lm(path, "constitution.judge", options.trust_remote_code)
        self.tokenizer = load_tokenizer(path, "constitution.judge", options.trust_remote_code)
        self.tokenizer.truncation_side = "left"
        self.yes_id = single_token(self.tokenizer, options.yes, "yes")
        self.no_id = single_token(self.tokenizer, options.no, "no")
        if context is not None and context.device is not None:
            self.judge.to(context.device)
        self.judge.eval()
        self.judge.requires_grad_(False)

    def judge_inputs(self, prompts, completions) -> list[str]:
        """Completion-major: all principles of completion 0, then of completion 1, ..."""
        return [self.options.template.format(prompt=p, completion=c, principle=pr.text)
                for p, c in zip(prompts, completions) for pr in self.principles]

    def remote_probabilities(self, texts: list[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) for each text from the remote judge's top log-probs (NaN: abstain)."""
        yes, no = self.options.yes, self.options.no
        found = self.remote.scores([self.remote.logprobs_body(text) for text in texts],
                                   lambda reply: yes_probability(reply, yes, no), f"logprobs {yes!r} {no!r}")
        return torch.tensor([math.nan if p is None else p for p in found], dtype=torch.float64)

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) for each text, from the logits at its last position."""
        if self.remote is not None:
            return self.remote_probabilities(texts)
        out = []
        device = next(self.judge.parameters()).device
        for start in range(0, len(texts), self.options.batch_size):
            encoded = self.tokenizer(texts[start : start + self.options.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.options.max_length, add_special_tokens=False).to(device)
            position_ids = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            extra = {"logits_to_keep": 1} if accepts_logits_to_keep(type(self.judge)) else {}
            logits = self.judge(**encoded, position_ids=position_ids, **extra).logits[:, -1, :].float()
            out.append(torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]).cpu())
        return torch.cat(out)

    def score(self, batch):
        probs = self.probabilities(self.judge_inputs(batch.prompts, batch.completions))
        return probs.view(len(batch), len(self.principles)).double()

    def metrics(self) -> dict[str, float]:
        """The remote judge's requests, retries, errors, cache hits and latency (nothing for a local judge)."""
        return self.remote.metrics() if self.remote is not None else {}


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("constitution", ConstitutionOptions, Constitution)]
