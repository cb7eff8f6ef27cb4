"""The normalize phase: the normalizer plugin turns a batch's rewards into advantages, checked
here. The NaN-aware group statistics normalizers are built from are in
:mod:`zenalign.plugins.advantages`, where plugins import them.

Rewards arrive as ``(P, G, K)``: P prompts, G completions per prompt (a group), K objectives.
NaN means a reward source abstained on that completion: it is left out of every statistic, and
the completion's advantage is 0, never NaN.

Nothing here names a normalizer; the normalizers themselves are plugins in ``plugins/``.
"""

from __future__ import annotations

from typing import Any

import torch

from zenalign.errors import PluginError
from zenalign.plugins import Objectives


def compute_advantages(normalizer: Any, rewards: torch.Tensor, objectives: Objectives, group_size: int,
                       name: str) -> torch.Tensor:
    """Advantages ``(N,)`` float32 for the global batch from rewards ``(N, K)``: ``normalizer``
    (the plugin named ``name``) sees them as ``(P, G, K)`` groups and must return one finite,
    non-NaN advantage per completion."""
    n, k = rewards.shape
    advantages = normalizer(rewards.view(n // group_size, group_size, k), objectives)
    if not isinstance(advantages, torch.Tensor) or advantages.numel() != n:
        raise PluginError(
            f"normalizer '{name}' returned {getattr(advantages, 'shape', type(advantages).__name__)}; expected one "
            f"advantage per completion ({n // group_size}, {group_size})"
        )
    if not torch.isfinite(advantages).all():
        raise PluginError(f"normalizer '{name}' returned NaN or infinite advantages; advantages must be finite")
    return advantages.reshape(n).to(torch.float32)
