"""Built-in policy losses: the GRPO clipped surrogate (the default), GSPO and CISPO.

Each is a ``PolicyLossType`` chosen by the recipe's ``loss: {type: NAME, ...}``. A policy loss
turns per-token log-probs into per-token losses (:meth:`per_token`) and says how they are
weighted into one number (:meth:`token_weights`); the engine sums ``weights * loss`` over the
batch's micro-batches. Each loss's options declare its hyperparameters; the KL penalty to the
reference is added per token by every built-in, weighted by ``grpo.kl_coef`` (given to the factory
as ``context.kl_coef``) and estimated by the loss's own ``kl_estimator``.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from zenalign import hookimpl
from zenalign.errors import PluginError
from zenalign.plugins import (AggregationOptions, GRPOLoss, GRPOLossOptions, KLOptions, PolicyLossType, TokenLoss,
                              add_kl_penalty, per_token_advantages, token_weights)


def grpo_loss(options: GRPOLossOptions, context) -> GRPOLoss:
    """The clipped GRPO surrogate (DeepSeekMath, arXiv 2402.03300) with its clip ranges and aggregation."""
    return GRPOLoss.from_options(options, context.kl_coef, context.max_new_tokens)


class GSPOOptions(KLOptions):
    epsilon: float = Field(3e-4, gt=0.0, lt=1.0, description="Lower clip range of the sequence ratio: [1 - epsilon, ...]. "
                           "Sequence ratios stay near 1, so the range is far narrower than a token ratio's; the "
                           "paper uses 3e-4.")
    epsilon_high: float = Field(4e-4, gt=0.0, description="Upper clip range [..., 1 + epsilon_high]; the paper uses 4e-4.")


class GSPOLoss:
    """GSPO (Group Sequence Policy Optimization, arXiv 2507.18071): one importance ratio per
    completion, the geometric mean of its token ratios, clipped as a whole.

        s_i = exp(mean_t (log pi(y_it) - log pi_old(y_it)))
        loss_i = -min(s_i * A_i, clip(s_i, 1 - eps, 1 + eps_high) * A_i)

    Written per token as GSPO-token: s_it = sg(s_i) * pi(y_it) / sg(pi(y_it)) has the value s_i
    and the gradient s_i * grad log pi(y_it), so the mean over a completion's tokens has the
    gradient of the sequence objective. The weights are always the per-completion mean (the
    paper's 1/G sum over completions of the sequence loss): it has no `aggregation` option.
    """

    skips_zero_advantage_rows = True
    takes_token_advantages = False  # one ratio per completion needs one advantage per completion

    def __init__(self, options: GSPOOptions, context):
        self.clip_low, self.clip_high = options.epsilon, options.epsilon_high
        self.kl_coef, self.kl_estimator = context.kl_coef, options.kl_estimator
        self.max_new_tokens = context.max_new_tokens

    def token_weights(self, mask, num_sequences=None, num_tokens=None):
        return token_weights(mask, "grpo", self.max_new_tokens, num_sequences, num_tokens)

    def per_token(self, logp, old_logp, advantages, ref_logp=None, mask=None) -> TokenLoss:
        m = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)               # (N, Tc)
        log_ratio = (logp - old_logp) * m                                                   # (N, Tc)
        seq_ratio = torch.exp(log_ratio.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0))  # (N, 1) s_i
        ratio = seq_ratio.detach() * torch.exp(logp - logp.detach())                        # (N, Tc) value s_i
        if advantages.dim() != 1:
            raise PluginError("policy loss 'gspo' takes one advantage per completion; the normalizer gives one per token "
                              "(a learned critic): use the grpo or cispo loss")
        adv = advantages.to(logp.dtype).unsqueeze(1)                                        # (N, 1)
        clipped = torch.clamp(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high) * adv       # (N, Tc)
        loss = -torch.minimum(ratio * adv, clipped)                                         # (N, Tc)
        is_clipped = ((ratio < 1.0 - self.clip_low) & (adv < 0)) | ((ratio > 1.0 + self.clip_high) & (adv > 0))
        total, kl = add_kl_penalty(loss, logp, ref_logp, self.kl_coef, self.kl_estimator)  # (N, Tc) each
        return TokenLoss(loss=total, ratio=ratio.detach().expand_as(logp), clipped=is_clipped.to(logp.dtype), kl=kl,
                         policy=loss)


class CISPOOptions(KLOptions, AggregationOptions):
    epsilon_low: Optional[float] = Field(None, ge=0.0, le=1.0, description="Lower bound of the importance weight, "
                                         "1 - epsilon_low; null leaves it unbounded below, as the paper does.")
    epsilon_high: float = Field(3.0, gt=0.0, description="Upper bound of the importance weight, 1 + epsilon_high. "
                                "The paper tunes only this one; 3 (a weight of at most 4) is a common one-sided default.")


class CISPOLoss:
    """CISPO (Clipped IS-weight Policy Optimization, MiniMax-M1, arXiv 2506.13585): REINFORCE with
    the token's importance weight clipped and detached, so every token keeps its gradient.

        loss_t = -sg(clip(pi / pi_old, 1 - eps_low, 1 + eps_high)) * A_i * log pi(y_t)

    Where GRPO's min() drops the gradient of a token whose ratio left the clip range, CISPO only
    bounds that token's weight. The paper averages over all tokens of the batch: set
    `aggregation: dapo` for that. Its clip range is its own (epsilon_low, epsilon_high), not grpo's.
    """

    skips_zero_advantage_rows = True

    def __init__(self, options: CISPOOptions, context):
        self.low = 0.0 if options.epsilon_low is None else 1.0 - options.epsilon_low
        self.high = 1.0 + options.epsilon_high
        self.kl_coef, self.kl_estimator = context.kl_coef, options.kl_estimator
        self.aggregation, self.max_new_tokens = options.aggregation, context.max_new_tokens

    def token_weights(self, mask, num_sequences=None, num_tokens=None):
        return token_weights(mask, self.aggregation, self.max_new_tokens, num_sequences, num_tokens)

    def per_token(self, logp, old_logp, advantages, ref_logp=None, mask=None) -> TokenLoss:
        ratio = torch.exp(logp - old_logp)                                                  # (N, Tc)
        weight = torch.clamp(ratio, self.low, self.high).detach()                           # (N, Tc) sg(clip(r))
        adv = per_token_advantages(advantages, logp)                                        # (N, 1) or (N, Tc)
        loss = -weight * adv * logp                                                         # (N, Tc)
        is_clipped = (ratio < self.low) | (ratio > self.high)                               # (N, Tc) weight bounded
        total, kl = add_kl_penalty(loss, logp, ref_logp, self.kl_coef, self.kl_estimator)  # (N, Tc) each
        return TokenLoss(loss=total, ratio=ratio, clipped=is_clipped.to(logp.dtype), kl=kl, policy=loss)


@hookimpl
def zenalign_policy_loss_types():
    return [
        PolicyLossType("grpo", GRPOLossOptions, grpo_loss, default=True,
                       description="The clipped GRPO surrogate per token, with its clip ranges and aggregation (arXiv 2402.03300)."),
        PolicyLossType("gspo", GSPOOptions, GSPOLoss,
                       description="GSPO: one clipped ratio per completion, the geometric mean of its tokens' (arXiv 2507.18071)."),
        PolicyLossType("cispo", CISPOOptions, CISPOLoss,
                       description="CISPO: REINFORCE with clipped, detached token weights (MiniMax-M1, arXiv 2506.13585)."),
    ]
