"""The reference and normalize phases of a step: the reference log-probs (when a KL term needs
them), then the advantages, one per completion from an advantage normalizer, or one per token
from a critic (:class:`~zenalign.plugins.Critic`, PPO's).

A token-level normalizer needs pi_old's log-probs before the update (for the KL in its reward):
they come from a no-gradient pass here and are reused by the update when ``num_iterations`` > 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from zenalign.errors import PluginError
from zenalign.grpo.advantages import compute_advantages
from zenalign.grpo.metrics import PhaseTimer
from zenalign.generation.rollout import Rollout
from zenalign.plugins import Critic, Objectives, RunContext, TokenBatch
from zenalign.train.update import PolicyUpdate


@dataclass
class StepAdvantages:
    """``local``: this process's advantages, ``(N_local,)`` or ``(N_local, Tc)``; ``per_completion``
    ``(N_local,)`` (a token-level advantage's mean over the completion, for samples.jsonl);
    ``global_`` ``(N,)`` over every process (None when token-level)."""

    local: torch.Tensor
    per_completion: torch.Tensor
    global_: Optional[torch.Tensor]
    ref_logp: Optional[torch.Tensor] = None
    old_logp: Optional[torch.Tensor] = None  # pi_old, when a token-level normalizer computed it and mu > 1
    tokens: Optional[TokenBatch] = None  # for the critic's own update


def step_advantages(normalizer: Any, name: str, updater: PolicyUpdate, rollout: Rollout, rewards: torch.Tensor,
                    objectives: Objectives, group_size: int, first: int, loss_mask: Optional[torch.Tensor],
                    context: RunContext, timer: PhaseTimer) -> StepAdvantages:
    """The step's advantages from the global ``(N, K)`` rewards; this process's rows start at ``first``."""
    ref_logp = None
    if updater.has_reference:
        with timer("reference"):
            ref_logp = updater.reference_logprobs(rollout)                           # (N_local, Tc)
    with timer("normalize"):
        if not isinstance(normalizer, Critic):
            everything = compute_advantages(normalizer, rewards, objectives, group_size, name)  # (N,)
            local = everything[first : first + len(rollout)]
            return StepAdvantages(local, local, everything, ref_logp)
        mask = rollout.completion_mask
        if loss_mask is not None:
            mask = mask * loss_mask.to(mask.device, mask.dtype).unsqueeze(1)
        updater.engine.train_model.train()  # pi_old as the update will see it (dropout included)
        old_logp = updater.logprobs(updater.engine.train_model, rollout)             # (N_local, Tc)
        tokens = TokenBatch(rollout.sequences, rollout.attention_mask, rollout.prompt_length, mask, old_logp, ref_logp)
        local = normalizer.token_advantages(tokens, rewards[first : first + len(rollout)], objectives, context)
        if not isinstance(local, torch.Tensor) or tuple(local.shape) != tuple(mask.shape) or not torch.isfinite(local).all():
            raise PluginError(f"normalizer '{name}' returned token advantages of shape "
                              f"{tuple(getattr(local, 'shape', ()))}; expected finite values of shape {tuple(mask.shape)}")
        m = mask.to(local.dtype)
        per_completion = (local * m).sum(1) / m.sum(1).clamp(min=1.0)
        return StepAdvantages(local, per_completion, None, ref_logp,
                              old_logp if updater.num_iterations > 1 else None, tokens)
