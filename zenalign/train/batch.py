"""One step's data, from sampling to the update: :class:`StepBatch`.

The collector (:mod:`zenalign.train.collect`) fills what sampling, scoring and the rollout filters
produce; the normalize phase (:mod:`zenalign.train.advantage`) adds the reference log-probs and
the advantages; :class:`~zenalign.train.update.PolicyUpdate` takes the batch as it then is.

Shapes: P prompts and G completions per prompt in the global batch (every process), N = P * G;
this process samples ``P_local`` whole groups, ``N_local`` completions of ``Tc`` tokens at most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from zenalign.generation.rollout import Rollout
from zenalign.plugins import TokenBatch


@dataclass
class StepBatch:
    """A step's batch (see the module docstring for the shapes).

    ``rollout`` is kept as the generator returns it, since evaluation samples rollouts outside of
    any step: it holds the token rows (the prompt left-padded, the completion right-padded), their
    attention mask, the decoded completions and the sampler's log-probs (vLLM; None when the
    policy's own forward sampled).
    """

    step: int
    group_size: int
    records: list[dict[str, Any]]  # this process's prompt records, one per group (P_local)
    prompts: list[str]  # their prompts as the policy saw them, rendered once
    rollout: Rollout  # this process's token rows, (N_local, Tp + Tc)
    rewards: torch.Tensor  # (P, G, K) over every process; NaN in the groups a filter dropped
    sampled_rewards: torch.Tensor  # (M, K): every completion sampled this step, over all rounds (for the metrics)
    keep: torch.Tensor  # (P,) bool: the groups trained on (False: dropped by a rollout filter)
    first: int  # the index of this process's first completion in the global batch
    # (N_local,) bool: which of this process's completions count in the loss (a filter's choice);
    # None: all of them
    completion_mask: Optional[torch.Tensor] = None
    # (N_local, Tc): 1 on the tokens the policy produced, 0 on those tools or environments inserted
    # and on padding; default: the rollout's (Rollout.policy_token_mask)
    policy_mask: Optional[torch.Tensor] = None
    metrics: dict[str, float] = field(default_factory=dict)  # the filters' metrics
    # from the normalize phase
    ref_logp: Optional[torch.Tensor] = None  # (N_local, Tc) under the KL reference, when there is a KL term
    old_logp: Optional[torch.Tensor] = None  # (N_local, Tc) under pi_old, when a token-level normalizer needed it
    advantages: Optional[torch.Tensor] = None  # (N_local,) one per completion, or (N_local, Tc) one per token
    advantages_global: Optional[torch.Tensor] = None  # (N,) over every process; None when token-level

    def __post_init__(self):
        if self.policy_mask is None:
            self.policy_mask = self.rollout.policy_token_mask

    @classmethod
    def for_update(cls, rollout: Rollout, advantages: torch.Tensor, *, ref_logp: Optional[torch.Tensor] = None,
                   old_logp: Optional[torch.Tensor] = None, completion_mask: Optional[torch.Tensor] = None,
                   step: int = 0) -> "StepBatch":
        """A batch with only what the update reads (one process, no rewards): for driving
        :class:`~zenalign.train.update.PolicyUpdate` directly, as benchmarks and tests do."""
        n = len(rollout)
        return cls(step, 1, [], [], rollout, torch.empty(n, 1, 0), torch.empty(n, 0), torch.ones(n, dtype=torch.bool),
                   0, completion_mask, ref_logp=ref_logp, old_logp=old_logp, advantages=advantages)

    def __len__(self) -> int:
        return len(self.rollout)

    @property
    def local_rewards(self) -> torch.Tensor:
        """This process's rewards, ``(N_local, K)``."""
        flat = self.rewards.reshape(-1, self.rewards.shape[-1])
        return flat[self.first : self.first + len(self)]

    @property
    def loss_mask(self) -> torch.Tensor:
        """``(N_local, Tc)``: the tokens the loss sums over, the policy's tokens of the completions
        that count."""
        mask = self.policy_mask
        if self.completion_mask is None:
            return mask
        return mask * self.completion_mask.to(mask.device, mask.dtype).unsqueeze(1)

    @property
    def per_completion_advantages(self) -> torch.Tensor:
        """``(N_local,)``: the advantage of each completion (a token-level one's mean over its tokens)."""
        if self.advantages.dim() == 1:
            return self.advantages
        m = self.loss_mask.to(self.advantages.dtype)
        return (self.advantages * m).sum(1) / m.sum(1).clamp(min=1.0)

    def token_batch(self) -> TokenBatch:
        """The view a critic plugin reads (:class:`~zenalign.plugins.TokenBatch`)."""
        r = self.rollout
        return TokenBatch(r.sequences, r.attention_mask, r.prompt_length, self.loss_mask, self.old_logp, self.ref_logp)
