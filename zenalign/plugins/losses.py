"""The GRPO policy loss: the clipped surrogate, the KL penalty to the reference, and how per-token
losses are aggregated into one number.

For completion i and token t, with ratio rho = pi_theta / pi_old and advantage A_i:

    loss_{i,t} = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_{i,t}

KL_{i,t} defaults to the k3 estimator pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (GRPO paper,
eq. 4). Per-token losses become one number through *token weights* computed once for the whole
batch (see :func:`token_weights`), so splitting the batch into micro-batches changes memory use,
never the loss or its gradient.

:class:`GRPOLoss` holds the hyperparameters, set once from its options (the recipe's ``loss:
{type: grpo, clip_epsilon, clip_epsilon_high, kl_estimator, aggregation}``) and the two run settings
it needs besides them (``grpo.kl_coef``, ``sampling.max_new_tokens``); the training loop never reads
the loss fields of the recipe again.

Where this departs from the paper:
1. the ``dr_grpo`` and ``dapo`` aggregations are offered besides the paper's per-sequence mean;
2. the upper clip range may differ from the lower one (DAPO's clip-higher);
3. the log-probabilities this loss receives are taken at the sampling temperature
   (:mod:`zenalign.models.logprobs`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import Field

from zenalign.plugins.api import Options, TokenLoss


class KLOptions(Options):
    """The KL estimator of a loss that adds the KL penalty per token (its weight is ``grpo.kl_coef``,
    which also decides whether the reference model is loaded at all)."""

    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="Per-token KL estimator (Schulman's naming). k3 = pi_ref/pi - log(pi_ref/pi) - 1 is "
        "unbiased and never negative; the GRPO paper uses it. Also accepted as `grpo.kl_estimator`.")


class AggregationOptions(Options):
    """How a loss's per-token losses become one number (:func:`token_weights`)."""

    aggregation: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="How per-token losses become one number. grpo: mean over each completion's tokens, "
        "then over completions (the paper). dapo: sum over all tokens / total tokens (token-level; long completions "
        "weigh more). dr_grpo: sum over all tokens / (completions * max_new_tokens), which removes the length bias "
        "of grpo (Dr. GRPO, arXiv 2503.20783). Also accepted as `grpo.loss_aggregation`.")


class GRPOLossOptions(KLOptions, AggregationOptions):
    """The options of the ``grpo`` loss: ``loss: {type: grpo, clip_epsilon, clip_epsilon_high,
    kl_estimator, aggregation}``."""

    clip_epsilon: float = Field(
        0.2, ge=0.0, lt=1.0, description="Lower clip range: the ratio pi/pi_old is clipped to [1 - clip_epsilon, ...]. "
        "The GRPO paper uses 0.1-0.2. Also accepted as `grpo.clip_epsilon`.")
    clip_epsilon_high: Optional[float] = Field(
        None, ge=0.0, description="Upper clip range [..., 1 + clip_epsilon_high]. Defaults to `clip_epsilon`; DAPO's "
        "clip-higher uses 0.28 to keep exploring low-probability tokens. Also accepted as `grpo.clip_epsilon_high`.")

    @property
    def upper_clip_epsilon(self) -> float:
        """The upper clip range in force: `clip_epsilon_high`, or `clip_epsilon` when it is left out."""
        return self.clip_epsilon if self.clip_epsilon_high is None else self.clip_epsilon_high


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


def add_kl_penalty(loss: torch.Tensor, logp: torch.Tensor, ref_logp: Optional[torch.Tensor], kl_coef: float,
                   estimator: str = "k3") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``loss + kl_coef * KL`` per token and the KL estimate, ``(N, Tc)`` each; without a reference
    (``ref_logp`` None) the loss as it is and no KL. Every built-in policy loss adds its KL here."""
    if ref_logp is None:
        return loss, None
    kl = kl_estimate(logp, ref_logp, estimator)                                   # (N, Tc)
    return (loss + kl_coef * kl if kl_coef else loss), kl


def per_token_advantages(advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Advantages in ``logp``'s dtype, shaped to broadcast over tokens: ``(N,)`` one per completion
    becomes ``(N, 1)``; ``(N, Tc)`` one per token (PPO's GAE) stays as it is."""
    advantages = advantages.to(logp.dtype)
    return advantages.unsqueeze(1) if advantages.dim() == 1 else advantages


def high_entropy_tokens(entropy: torch.Tensor, values: torch.Tensor, quantile: float) -> tuple[torch.Tensor, float]:
    """``(N, Tc)`` 1.0 where ``entropy`` is at least the ``1 - quantile`` quantile of ``values`` (the
    entropies of every completion token of the batch), else 0.0, and that threshold: the top
    ``quantile`` share of tokens by entropy, which alone carry the policy gradient in "Beyond the
    80/20 rule" (arXiv 2506.01939; 0.2 there). The quantile interpolates linearly, as
    ``torch.quantile`` does."""
    if values.numel() == 0:
        return torch.ones_like(entropy), float("nan")
    ordered = values.double().flatten().sort().values  # torch.quantile refuses more than 2^24 values
    position = (1.0 - quantile) * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    threshold = float(ordered[low] + (position - low) * (ordered[high] - ordered[low]))
    return (entropy >= threshold).to(entropy.dtype), threshold


class GRPOLoss:
    """The clipped GRPO surrogate plus the KL penalty, aggregated with batch-wide token weights.

    ``GRPOLoss.from_options(options, kl_coef, max_new_tokens)`` builds it from its options and the
    two run settings it needs besides them (``max_new_tokens`` for Dr. GRPO's constant normaliser). Calling it on a micro-batch returns that
    micro-batch's share of the batch loss, ``sum(weights * per-token loss)``, and the per-token terms.
    It is the default policy loss (``loss: {type: grpo}``), registered by the built-in plugins.
    """

    skips_zero_advantage_rows = True  # -min(1 * 0, clip(1) * 0) = 0 with a zero gradient

    def __init__(self, clip_epsilon: float, clip_epsilon_high: float, kl_coef: float = 0.0,
                 kl_estimator: str = "k3", aggregation: str = "grpo", max_new_tokens: int = 1):
        self.clip_low = clip_epsilon
        self.clip_high = clip_epsilon_high
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.aggregation = aggregation
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_options(cls, options: GRPOLossOptions, kl_coef: float, max_new_tokens: int) -> "GRPOLoss":
        return cls(options.clip_epsilon, options.upper_clip_epsilon, kl_coef, options.kl_estimator, options.aggregation,
                   max_new_tokens)

    @classmethod
    def from_recipe(cls, recipe: Any) -> "GRPOLoss":
        """The loss a recipe's ``loss`` section gives when it is a grpo entry (else the grpo defaults)."""
        options = recipe.loss if isinstance(recipe.loss, GRPOLossOptions) else GRPOLossOptions()
        return cls.from_options(options, recipe.grpo.kl_coef, recipe.sampling.max_new_tokens)

    def token_weights(self, mask: torch.Tensor, num_sequences: Optional[int] = None,
                      num_tokens: Optional[float] = None) -> torch.Tensor:
        """``(N, Tc)`` weights of this loss's aggregation; see :func:`token_weights`."""
        return token_weights(mask, self.aggregation, self.max_new_tokens, num_sequences, num_tokens)

    def per_token(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  ref_logp: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> TokenLoss:
        """The loss of every token before aggregation. ``ref_logp=None``: no KL term. ``mask`` is
        not needed: every token's loss stands on its own (the weights carry the mask)."""
        ratio = torch.exp(logp - old_logp)                                    # (N, Tc) pi / pi_old
        adv = per_token_advantages(advantages, logp)                          # (N, 1) or (N, Tc)
        unclipped = ratio * adv                                               # (N, Tc)
        clipped = torch.clamp(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high) * adv  # (N, Tc)
        loss = -torch.minimum(unclipped, clipped)                             # (N, Tc) pessimistic bound
        is_clipped = (((ratio < 1.0 - self.clip_low) & (adv < 0))             # (N, Tc) where clipping
                      | ((ratio > 1.0 + self.clip_high) & (adv > 0)))         #   removed the gradient
        total, kl = add_kl_penalty(loss, logp, ref_logp, self.kl_coef, self.kl_estimator)  # (N, Tc) each
        return TokenLoss(loss=total, ratio=ratio, clipped=is_clipped.to(logp.dtype), kl=kl, policy=loss)

    def __call__(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                 ref_logp: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, TokenLoss]:
        token = self.per_token(logp, old_logp, advantages, ref_logp)         # (N, Tc) each
        return (token.loss * weights).sum(), token                            # () this micro-batch's share


def token_weights(
    mask: torch.Tensor,
    aggregation: str,
    max_new_tokens: Optional[int],
    num_sequences: Optional[int] = None,
    num_tokens: Optional[float] = None,
) -> torch.Tensor:
    """Weights w such that the batch loss is ``sum(w * per_token_loss)``, ``(N, Tc)``.

    - grpo:    w = 1 / (|o_i| * B)          mean over tokens, then over completions
    - dapo:    w = 1 / sum_i |o_i|          one mean over all tokens of the batch
    - dr_grpo: w = 1 / (B * max_new_tokens) a constant, so no length bias

    ``mask`` holds the tokens that count: the policy's, so |o_i| counts the tokens the policy sampled
    (not those a tool or an environment inserted into an episode). ``num_sequences`` (B) and
    ``num_tokens`` default to this batch's rows and tokens; pass the global counts when rows are
    spread over several processes.
    """
    mask = mask.to(torch.float32)
    rows = num_sequences if num_sequences is not None else mask.shape[0]
    tokens = float(num_tokens) if num_tokens is not None else float(mask.sum())
    if aggregation == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0) / rows
    if aggregation == "dapo":
        return mask / max(tokens, 1.0)
    if aggregation == "dr_grpo":
        if max_new_tokens is None:
            raise ValueError("the dr_grpo aggregation divides by max_new_tokens; none was given")
        return mask / float(rows * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use grpo, dapo or dr_grpo")
