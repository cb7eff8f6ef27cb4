"""Token log-probabilities, the clipped GRPO surrogate, KL estimators and loss aggregation.

For completion i and token t, with ratio rho = pi_theta / pi_old and advantage A_i:

    loss_{i,t} = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_{i,t}

KL_{i,t} defaults to the k3 estimator pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (GRPO paper,
eq. 4). Per-token losses become one number through *token weights* computed once for the whole
batch (see :func:`token_weights`), so splitting the batch into micro-batches changes memory use,
never the loss or its gradient.

Where this departs from the paper: log-probabilities divide the logits by the sampling
temperature (the gradient is then that of the distribution the completions were drawn from),
and the ``dr_grpo``/``dapo`` aggregations are offered besides the paper's per-sequence mean.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch


@lru_cache(maxsize=None)
def accepts_logits_to_keep(forward_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return False


def completion_logprobs(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi(token | prefix) for every completion token, ``(N, Tc)``.

    Position ids follow the attention mask (left padding does not shift positions), matching
    what ``generate`` used. The LM head runs only on the positions that predict completion
    tokens when the model supports ``logits_to_keep``.
    """
    completion_length = sequences.shape[1] - prompt_length
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    kwargs = {}
    if accepts_logits_to_keep(type(getattr(model, "module", model))):  # DDP and DeepSpeed wrap the model
        kwargs["logits_to_keep"] = completion_length + 1
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    ).logits
    logits = logits[:, -(completion_length + 1) : -1, :].float()  # (N, Tc, V): predicts each completion token
    if temperature != 1.0:
        logits = logits / temperature
    targets = sequences[:, prompt_length:].unsqueeze(-1)  # (N, Tc, 1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate from the sampled token's log-probs.

    With x = log pi_ref - log pi_theta: k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1.
    """
    x = ref_logp - logp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return torch.exp(x) - x - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


@dataclass
class TokenLoss:
    """Per-token loss and the per-token quantities that metrics are made of, all ``(N, Tc)``."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor  # 1.0 where clipping removed the gradient
    kl: Optional[torch.Tensor]


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> TokenLoss:
    """The clipped surrogate plus the KL penalty, per token (before aggregation)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # (N, 1): one advantage per completion
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    is_clipped = ((ratio < 1.0 - clip_low) & (adv < 0)) | ((ratio > 1.0 + clip_high) & (adv > 0))
    kl = None
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        if kl_coef:
            loss = loss + kl_coef * kl
    return TokenLoss(loss=loss, ratio=ratio, clipped=is_clipped.to(logp.dtype), kl=kl)


def token_weights(
    mask: torch.Tensor,
    aggregation: str,
    max_new_tokens: int,
    num_sequences: Optional[int] = None,
    num_tokens: Optional[float] = None,
) -> torch.Tensor:
    """Weights w such that the batch loss is ``sum(w * per_token_loss)``, ``(N, Tc)``.

    - grpo:    w = 1 / (|o_i| * B)          mean over tokens, then over completions
    - dapo:    w = 1 / sum_i |o_i|          one mean over all tokens of the batch
    - dr_grpo: w = 1 / (B * max_new_tokens) a constant, so no length bias

    ``num_sequences`` (B) and ``num_tokens`` default to this batch's rows and tokens; pass the
    global counts when rows are spread over several processes.
    """
    mask = mask.to(torch.float32)
    rows = num_sequences if num_sequences is not None else mask.shape[0]
    tokens = float(num_tokens) if num_tokens is not None else float(mask.sum())
    if aggregation == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0) / rows
    if aggregation == "dapo":
        return mask / max(tokens, 1.0)
    if aggregation == "dr_grpo":
        return mask / float(rows * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use grpo, dapo or dr_grpo")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the tokens where ``mask`` is 1 (0.0 if there are none)."""
    mask = mask.to(values.dtype)
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0
