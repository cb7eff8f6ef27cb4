"""Step metrics: rewards per objective, group statistics, and phase timings."""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Optional, Sequence

import torch

from zenalign.plugins.advantages import combine_objectives, zero_variance
from zenalign.plugins import Objectives


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


def _finite_mean(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else float("nan")


def _finite_std(values: torch.Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.std(unbiased=False)) if values.numel() else float("nan")


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation over the completions both objectives scored; NaN if either is constant."""
    both = ~torch.isnan(a) & ~torch.isnan(b)
    if both.sum() < 2:
        return float("nan")
    x, y = a[both] - a[both].mean(), b[both] - b[both].mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def reward_metrics(rewards: torch.Tensor, objectives: Objectives, group_size: int, prefix: str = "") -> dict[str, Any]:
    """Weighted reward mean and std; per objective: mean, std, and (for groups) the share of groups
    whose scores are all equal (they give no gradient), counted among the groups that objective
    scored; and the correlation of every pair of objectives.

    ``rewards`` is ``(N, K)`` with rows laid out group by group.
    """
    n, k = rewards.shape
    grouped = rewards.view(n // group_size, group_size, k)
    combined = combine_objectives(grouped, objectives.weights)  # (P, G)
    out: dict[str, Any] = {f"{prefix}reward_mean": _finite_mean(combined), f"{prefix}reward_std": _finite_std(combined)}
    if group_size > 1:
        out[f"{prefix}zero_std_frac"] = float(zero_variance(combined).float().mean())
    for j, name in enumerate(objectives.names):
        out[f"{prefix}reward_mean/{name}"] = _finite_mean(rewards[:, j])
        out[f"{prefix}abstain_frac/{name}"] = float(torch.isnan(rewards[:, j]).float().mean())  # NaN/None scores
        if k > 1:
            out[f"{prefix}reward_std/{name}"] = _finite_std(rewards[:, j])
        if group_size > 1 and k > 1:
            column = grouped[..., j]
            scored = (~torch.isnan(column)).sum(1) >= 2
            flat = zero_variance(column).squeeze(1)
            out[f"{prefix}zero_std_frac/{name}"] = float(flat[scored].float().mean()) if scored.any() else float("nan")
    for a in range(k):
        for b in range(a + 1, k):
            out[f"{prefix}corr/{objectives.names[a]}/{objectives.names[b]}"] = correlation(rewards[:, a], rewards[:, b])
    return out


def collapse_rate(rewards: torch.Tensor, advantages: torch.Tensor, tolerance: float = 1e-6) -> float:
    """Share of groups in which two *distinct* reward vectors got the same advantage.

    ``rewards`` is ``(P, G, K)``, ``advantages`` ``(P, G)``. Abstentions compare equal to each
    other. With one objective this can only happen through a normalizer's own ties; with several,
    summing before normalising collapses e.g. (1, 0) and (0, 1) onto one value (GDPO, arXiv 2601.05242).
    """
    filled = torch.nan_to_num(rewards, nan=float("inf"))
    distinct = (filled.unsqueeze(2) != filled.unsqueeze(1)).any(-1)  # (P, G, G)
    same = (advantages.unsqueeze(2) - advantages.unsqueeze(1)).abs() <= tolerance
    return float((distinct & same).flatten(1).any(1).float().mean())


def hacking_warnings(history: list[dict[str, Any]], names: tuple[str, ...], patience: int) -> list[str]:
    """Pairs (a, b) where objective a's eval mean rose and b's fell at each of the last
    ``patience`` evaluations: the signature of one objective being optimised at another's expense."""
    if patience <= 0 or len(history) < patience + 1:
        return []
    recent = history[-(patience + 1):]

    def deltas(name):
        values = [h.get(f"eval/reward_mean/{name}") for h in recent]
        if any(v is None or v != v for v in values):
            return None
        return [b - a for a, b in zip(values, values[1:])]

    trends = {name: deltas(name) for name in names}
    found = []
    for a in names:
        for b in names:
            da, db = trends[a], trends[b]
            if a != b and da and db and all(x > 0 for x in da) and all(y < 0 for y in db):
                found.append(f"'{a}' rose while '{b}' fell for {patience} consecutive evaluations")
    return found


def sample_lines(step: int, prompts: list[str], completions: list[str], rewards: torch.Tensor,
                 advantages: torch.Tensor, names: tuple[str, ...], group_size: int) -> list[dict[str, Any]]:
    """samples.jsonl lines for the first ``len(prompts)`` groups of a step: each completion with its
    prompt, its reward per objective and its advantage."""
    return [{"step": step, "prompt": prompt, "completion": completions[i],
             "rewards": dict(zip(names, rewards[i].tolist())), "advantage": float(advantages[i])}
            for p, prompt in enumerate(prompts) for i in range(p * group_size, (p + 1) * group_size)]


# ---------------------------------------------------------------------------------------------- k samples per prompt

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al. 2021,
    arXiv 2107.03374): 1 - C(n-c, k) / C(n, k), the chance that k of them drawn without replacement
    hold a correct one. As the product 1 - prod_{i=n-c+1..n} (1 - k/i), which forms no binomial
    coefficient (C(1000, 500) overflows a float)."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def extract_answer(completion: str, pattern: Optional[re.Pattern]) -> Optional[str]:
    """The answer a completion gives: the last match of ``pattern`` (its first group, if it has one), or
    the whole completion stripped; None when there is no match (or nothing but whitespace)."""
    if pattern is None:
        return completion.strip() or None
    matches = list(pattern.finditer(completion))
    if not matches:
        return None
    return matches[-1].group(1) if pattern.groups else matches[-1].group(0)


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[int]:
    """The index of the first sample giving the most frequent answer (None: no answer, no vote).
    Ties go to the answer given first. None when no sample voted."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def k_sample_metrics(correct: torch.Tensor, answers: Sequence[Sequence[Optional[str]]], ks: Sequence[int]) -> torch.Tensor:
    """Per prompt, pass@k for each k of ``ks`` and then maj@k for each: ``(P, 2 * len(ks))``.

    ``correct`` is ``(P, n)`` bool, ``answers`` the P lists of n extracted answers. pass@k uses all n
    samples; maj@k votes over the first k (samples are drawn independently, so they are any k)."""
    rows = []
    for hits, votes in zip(correct.tolist(), answers):
        passes = [pass_at_k(len(hits), sum(hits), k) for k in ks]
        winners = [majority_vote(votes[:k]) for k in ks]
        rows.append(passes + [float(i is not None and hits[i]) for i in winners])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 2 * len(ks))
