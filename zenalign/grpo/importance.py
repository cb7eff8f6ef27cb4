"""Importance weights for completions sampled by another engine than the trainer's forward (vLLM).

The completions were drawn from pi_vllm, while the loss is an expectation over pi_old: the same
weights, but other kernels (and often another precision), so the two differ token by token. The
correction weighs each token's loss by an importance ratio, bounded so one unlikely token cannot
blow the gradient up:

- ``token_truncate``: truncated importance sampling (TIS; Yao et al., 2025, "Your Efficient RL
  Framework Secretly Brings You Off-Policy RL Training", https://fengyao.notion.site/off-policy-rl),
  w_t = min(pi_old(y_t) / pi_vllm(y_t), cap).
- ``sequence_mask``: masked importance sampling over whole completions (sequence-level MIS; Liu, Li,
  Fu, Wang, Liu and Shen, 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
  Training-Inference Mismatch", yingru.notion.site; masking as in the Ling team's IcePop): with rho = prod_t pi_old(y_t) / pi_vllm(y_t) over the completion's tokens, every token
  of it is weighted by rho when rho <= cap, and by 0 (the completion leaves the loss) above.
- ``off``: weight 1.

Departure from TRL: the weight multiplies each token's whole loss, KL term included (the KL is an
expectation over the same samples), where TRL weights the policy-gradient term only. The
normalisation of the loss (its token or sequence counts) is not changed by the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ISStats:
    """Sums for the step's metrics: |log pi_old - log pi_vllm| over ``tokens`` completion tokens, and
    ``capped`` of ``units`` (tokens for token_truncate, completions for sequence_mask) capped or masked."""

    abs_diff: float = 0.0
    tokens: float = 0.0
    capped: float = 0.0
    units: float = 0.0


def importance_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> tuple[torch.Tensor, ISStats]:
    """Per-token weights ``(n, Tc)`` (0 at padding) and their statistics, from pi_old's and the
    sampler's log-probs of the sampled tokens, ``(n, Tc)`` each, and the loss mask ``(n, Tc)``: the
    policy's tokens, the only ones the sampler drew (an episode's inserted tokens have no sampler
    log-prob and are 0 in it, so they enter neither a weight, rho nor a statistic)."""
    m = mask.to(old_logp.dtype)                                                     # (n, Tc)
    log_ratio = (old_logp.detach() - sampler_logp.to(old_logp.dtype)) * m          # (n, Tc): log pi_old/pi_vllm
    stats = ISStats(abs_diff=float(log_ratio.abs().sum()), tokens=float(m.sum()))
    if mode == "token_truncate":
        ratio = log_ratio.exp()                                                     # (n, Tc)
        over = (ratio > cap) & mask.bool()
        stats.capped, stats.units = float(over.sum()), float(m.sum())
        return ratio.clamp(max=cap) * m, stats
    if mode == "sequence_mask":
        seq_log_ratio = log_ratio.sum(dim=1, keepdim=True)                          # (n, 1): log rho
        has_tokens = mask.bool().any(dim=1, keepdim=True)                           # (n, 1)
        masked = (seq_log_ratio > torch.log(torch.tensor(cap, dtype=old_logp.dtype))) & has_tokens
        stats.capped, stats.units = float(masked.sum()), float(has_tokens.sum())
        rho = seq_log_ratio.exp().masked_fill(masked, 0.0)                          # (n, 1); exp(log rho) <= cap
        return rho * m, stats
    if mode == "off":
        return m, stats
    raise ValueError(f"unknown importance-sampling mode {mode!r}")
