"""The reference and normalize phases of a step: the reference log-probs (when a KL term needs
them), then the advantages, one per completion from an advantage normalizer, or one per token
from a critic (:class:`~zenalign.plugins.Critic`, PPO's). Both go into the :class:`StepBatch`.

A token-level normalizer needs pi_old's log-probs before the update (for the KL in its reward):
they come from a no-gradient pass here and are reused by the update when ``num_iterations`` > 1.
"""

from __future__ import annotations

from typing import Any

import torch

from zenalign.errors import PluginError
from zenalign.grpo.advantages import compute_advantages
from zenalign.grpo.metrics import PhaseTimer
from zenalign.plugins import Critic, Objectives, RunContext
from zenalign.train.batch import StepBatch
from zenalign.train.update import PolicyUpdate


def step_advantages(batch: StepBatch, normalizer: Any, name: str, updater: PolicyUpdate, objectives: Objectives,
                    context: RunContext, timer: PhaseTimer) -> None:
    """Fill ``batch``'s reference log-probs and advantages from its global ``(P, G, K)`` rewards."""
    if updater.has_reference:
        with timer("reference"):
            batch.ref_logp = updater.reference_logprobs(batch.rollout)                   # (N_local, Tc)
    with timer("normalize"):
        if not isinstance(normalizer, Critic):
            flat = batch.rewards.reshape(-1, batch.rewards.shape[-1])                    # (N, K)
            batch.advantages_global = compute_advantages(normalizer, flat, objectives, batch.group_size, name)  # (N,)
            batch.advantages = batch.advantages_global[batch.first : batch.first + len(batch)]
            return
        batch.old_logp = updater.old_logprobs(batch.rollout)                             # (N_local, Tc)
        mask = batch.loss_mask
        local = normalizer.token_advantages(batch.token_batch(), batch.local_rewards, objectives, context)
        if not isinstance(local, torch.Tensor) or tuple(local.shape) != tuple(mask.shape) or not torch.isfinite(local).all():
            raise PluginError(f"normalizer '{name}' returned token advantages of shape "
                              f"{tuple(getattr(local, 'shape', ()))}; expected finite values of shape {tuple(mask.shape)}")
        batch.advantages = local
