"""PPO's advantage arithmetic for language models: per-token rewards with the KL penalty folded in,
generalized advantage estimation, whitening, and the clipped value loss.

A completion of T tokens is an episode of T actions. With the critic's value ``V_t`` of the state
before token t (the prompt and tokens < t), the token rewards of completion i are

    r_t = -beta * KL_t               for t < T - 1
    r_t = -beta * KL_t + R_i         at the last token (EOS, or the token max_new_tokens stopped at)

where ``KL_t`` estimates KL(pi_old || pi_ref) at that token (k1 = log pi_old - log pi_ref, as in
Ouyang et al., arXiv 2203.02155) and ``R_i`` is the completion's scalar reward. Then (Schulman et
al., arXiv 1506.02438), with ``V_T = 0`` after the last token:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lambda * A_{t+1},     A_T = 0
    G_t     = A_t + V_t                               (the critic's regression target)

Every tensor is ``(N, Tc)`` with a mask of the policy's tokens: positions past a completion's end
are ignored and come out as 0. In an episode (tool calls, an environment) the completion region also
holds tokens the policy did not sample (tool results, the next turn's chat headers); they are 0 in
the mask and are no time step: T counts the policy's tokens, ``V_{t+1}`` is the value before the
policy's next token, whatever was inserted before it (the state includes it), and their advantages
and returns are 0, so neither the policy nor the critic trains on them (verl's multi-turn GAE does
the same).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def token_rewards(rewards: torch.Tensor, mask: torch.Tensor, kl: Optional[torch.Tensor] = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """``(N, Tc)`` per-token rewards: ``-kl_coef * kl`` on every token of ``mask``, plus each
    completion's scalar reward ``rewards`` ``(N,)`` on its last one. A completion with no tokens gets nothing."""
    m = mask.to(torch.float64)
    out = torch.zeros_like(m) if kl is None or kl_coef == 0 else -kl_coef * kl.to(torch.float64) * m
    if m.shape[1] == 0:
        return out
    last = (m.long() * torch.arange(1, m.shape[1] + 1, device=m.device)).max(dim=1).values - 1  # (N,) -1: none
    rows = torch.nonzero(last >= 0).squeeze(1)
    out[rows, last[rows]] += rewards.to(torch.float64)[rows]
    return out


def gae(token_reward: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns ``(N, Tc)`` by generalized advantage estimation (module docstring).
    Position t is one of the policy's tokens where ``mask[:, t]`` is 1; a masked position (padding,
    or a token inserted into an episode) is skipped: A and V carry across it unchanged."""
    m = mask.to(torch.float64)
    r, v = token_reward.to(torch.float64) * m, values.to(torch.float64) * m
    advantages = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)       # A_{t+1}
    next_value = torch.zeros_like(running)                                         # V_{t+1}
    for t in reversed(range(r.shape[1])):
        real = m[:, t] > 0                                                         # (N,)
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = torch.where(real, delta + gamma * lam * running, running)        # carried over a masked t
        advantages[:, t] = running * m[:, t]
        next_value = torch.where(real, v[:, t], next_value)
    return advantages, (advantages + v) * m


def whiten(values: torch.Tensor, mask: torch.Tensor, all_sums: Callable[[list[float]], list[float]] = list,
           eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (of every process: ``all_sums`` sums
    a list of floats over processes), with the population variance; 0 where masked."""
    m = mask.to(torch.float64)
    x = values.to(torch.float64)
    count, total = all_sums([float(m.sum()), float((x * m).sum())])
    mean = total / max(count, 1.0)
    (squares,) = all_sums([float((((x - mean) * m) ** 2).sum())])
    var = squares / max(count, 1.0)
    return (x - mean) / (var + eps) ** 0.5 * m


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``0.5 * max((V - G)^2, (V_clip - G)^2)`` with ``V_clip = V_old + clamp(V - V_old, -clip, clip)``
    (PPO's value clipping; ``clip`` None: the plain squared error), and where the clipped term won."""
    plain = (values - returns) ** 2
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain)
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).to(values.dtype)
