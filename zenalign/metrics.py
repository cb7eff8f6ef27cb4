"""Step metrics: rewards per objective, group statistics, and phase timings."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch

from zenalign.advantages import combine_objectives, nan_std, zero_variance
from zenalign.plugin_types import Objectives


class PhaseTimer:
    """Wall time of each named phase of a step: ``with timer("sample"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{name}": round(seconds, 6) for name, seconds in self.seconds.items()}


def _finite_mean(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else float("nan")


def reward_metrics(rewards: torch.Tensor, objectives: Objectives, group_size: int, prefix: str = "") -> dict[str, Any]:
    """Mean and std of the weighted reward, each objective's mean, and the share of groups whose
    rewards are all equal (they contribute no gradient under group normalisation).

    ``rewards`` is ``(N, K)`` with rows laid out group by group.
    """
    n, k = rewards.shape
    grouped = rewards.view(n // group_size, group_size, k)
    combined = combine_objectives(grouped, objectives.weights)  # (P, G)
    flat = combined.reshape(1, -1)
    out: dict[str, Any] = {
        f"{prefix}reward_mean": _finite_mean(flat),
        f"{prefix}reward_std": float(nan_std(flat, unbiased=False)) if flat.numel() else float("nan"),
    }
    for j, name in enumerate(objectives.names):
        out[f"{prefix}reward_mean/{name}"] = _finite_mean(rewards[:, j])
    if group_size > 1:
        out[f"{prefix}zero_std_frac"] = float(zero_variance(combined).float().mean())
    return out
