"""NaN-aware group statistics that advantage normalizers are built from (the built-in ones and yours).

Rewards arrive as ``(P, G, K)``: P prompts, G completions per prompt (a group), K objectives.
NaN means a reward source abstained on that completion: it is left out of every statistic, and
the completion's advantage is 0, never NaN (:func:`finish`).
"""

from __future__ import annotations

import torch


def combine_objectives(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over objectives, ``(P, G, K) -> (P, G)``.

    Where a completion abstains on one objective but not all, that objective is filled in with
    its group's mean, so it adds nothing to the completion's deviation from the group. A
    completion that abstains on every objective stays NaN (left out downstream).
    """
    valid = ~torch.isnan(rewards)
    group_mean = torch.nanmean(rewards, dim=1, keepdim=True)  # (P, 1, K); NaN if all abstain
    filled = torch.where(valid, rewards, group_mean)
    filled = torch.nan_to_num(filled, nan=0.0)  # an objective nobody in the group scored: constant
    combined = (filled * weights.to(filled)).sum(-1)
    return combined.masked_fill(~valid.any(-1), float("nan"))


def valid_count(rewards: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Number of non-NaN entries along ``dim`` (kept as a dimension)."""
    return (~torch.isnan(rewards)).sum(dim, keepdim=True)


def nan_mean(rewards: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean over non-NaN entries (kept as a dimension); 0 where there are none."""
    return torch.nan_to_num(torch.nanmean(rewards, dim=dim, keepdim=True), nan=0.0)


def nan_std(rewards: torch.Tensor, dim: int = 1, unbiased: bool = True) -> torch.Tensor:
    """Standard deviation over non-NaN entries (kept as a dimension).

    ``unbiased`` divides by n - 1, as ``torch.std`` and the common GRPO implementations do.
    Returns 0 where fewer than two entries (one, unbiased) are valid. Deviations are scaled by
    their largest before squaring, so any finite rewards give a finite std.
    """
    n = valid_count(rewards, dim)
    deviation = torch.nan_to_num(rewards - nan_mean(rewards, dim), nan=0.0)
    denom = (n - 1 if unbiased else n).clamp(min=1)
    # scaled by the largest deviation before squaring, so rewards of 1e200 do not overflow to inf
    scale = deviation.abs().amax(dim, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    std = scale * ((deviation / scale) ** 2).sum(dim, keepdim=True).div(denom).sqrt()
    enough = n >= (2 if unbiased else 1)
    return torch.where(enough, std, torch.zeros_like(std))


def zero_variance(rewards: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """True where all non-NaN entries along ``dim`` are equal (or fewer than two are valid).

    Compared exactly (max == min), not through a floating-point std, so a group of identical
    rewards always gets all-zero advantages.
    """
    valid = ~torch.isnan(rewards)
    high = torch.where(valid, rewards, torch.full_like(rewards, -float("inf"))).amax(dim, keepdim=True)
    low = torch.where(valid, rewards, torch.full_like(rewards, float("inf"))).amin(dim, keepdim=True)
    return (high == low) | (valid.sum(dim, keepdim=True) < 2)


def finish(advantages: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Zero the advantages of abstaining completions and of any NaN that slipped through."""
    advantages = advantages.masked_fill(torch.isnan(rewards), 0.0)
    return torch.nan_to_num(advantages, nan=0.0, posinf=0.0, neginf=0.0)


def standardize_groups(rewards: torch.Tensor, eps: float, unbiased: bool = True) -> torch.Tensor:
    """``A_i = (r_i - mean_G) / (std_G + eps)`` over a ``(P, G)`` tensor; zero-variance groups -> 0."""
    deviation = rewards - nan_mean(rewards)
    advantages = deviation / (nan_std(rewards, unbiased=unbiased) + eps)
    advantages = advantages.masked_fill(zero_variance(rewards), 0.0)
    return finish(advantages, rewards)


def standardize_objectives(rewards: torch.Tensor, eps: float, unbiased: bool = True) -> torch.Tensor:
    """Group z-score of each objective on its own, ``(P, G, K) -> (P, G, K)``; abstentions -> 0."""
    return torch.stack([standardize_groups(rewards[..., k], eps, unbiased) for k in range(rewards.shape[-1])], dim=-1)


def weighted_sum(values: torch.Tensor, weights: torch.Tensor, indices: list[int] | None = None) -> torch.Tensor:
    """``sum_k w_k * values[..., k]`` over ``indices`` (all objectives by default), ``(P, G, K) -> (P, G)``."""
    indices = list(range(values.shape[-1])) if indices is None else indices
    if not indices:
        return torch.zeros(values.shape[:-1], dtype=values.dtype)
    w = weights.to(values)[indices]
    return (values[..., indices] * w).sum(-1)


def all_abstain(rewards: torch.Tensor) -> torch.Tensor:
    """``(P, G)``: True where a completion abstained on every objective."""
    return torch.isnan(rewards).all(-1)
