"""Constraints by Lagrange multipliers (Safe RLHF, Constrained GRPO).

Objectives with ``role: constraint`` must keep their batch mean ``>=`` (or ``<=``) a threshold.
Each constraint k has a multiplier lambda_k >= 0. Every objective is z-scored within its group
(Z_k), and the advantages are combined *after* normalisation:

    A = (sum_{r in rewards} w_r Z_r  +  sum_k lambda_k s_k Z_k) / (sum_r w_r + sum_k lambda_k)

with s_k = +1 for ">=" and -1 for "<=". Dividing by the total weight keeps the scale fixed as the
multipliers grow (Safe RLHF divides by 1 + lambda for the same reason). After each step the
multipliers take a projected dual-ascent step on the batch's violation:

    lambda_k <- clip(lambda_k + lr * s_k (threshold_k - mean_B(c_k)), 0, lambda_max)

so lambda grows while the constraint is violated and shrinks back to 0 once it holds.
Combining advantages rather than rewards keeps each multiplier's meaning: a reward-level sum
would be rescaled by the group std of the sum, distorting the trade-off (Constrained GRPO).
Sources: Dai et al., "Safe RLHF", arXiv 2310.12773; Girgis et al., "Constrained Group Relative
Policy Optimization", arXiv 2602.05863.
"""

from typing import Optional

import torch
from pydantic import Field

from zenalign import hookimpl
from zenalign.plugins import NormalizerType, Options, all_abstain, standardize_objectives


class LagrangianOptions(Options):
    lambda_lr: float = Field(0.5, gt=0, description="Dual-ascent step size of the multipliers.")
    lambda_init: float = Field(0.0, ge=0, description="Starting value of every multiplier.")
    lambda_max: Optional[float] = Field(100.0, gt=0, description="Upper bound of the multipliers (null: none).")
    eps: float = Field(1e-6, gt=0, description="Added to every group std before dividing.")


class Lagrangian:
    """Reward advantages plus lambda-weighted constraint advantages; lambdas by dual ascent."""

    enforces_constraints = True

    def __init__(self, options: LagrangianOptions):
        self.options = options
        self.lambdas: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, rewards, objectives):
        o = self.options
        z = standardize_objectives(rewards, o.eps)  # (P, G, K)
        numerator = torch.zeros(rewards.shape[:2], dtype=z.dtype)
        total = 0.0
        for k in objectives.reward_indices:
            w = float(objectives.weights[k])
            numerator += w * z[..., k]
            total += w
        violations = {}
        for k in objectives.constraint_indices:
            name = objectives.names[k]
            lam = self.lambdas.setdefault(name, o.lambda_init)
            sign = 1.0 if objectives.directions[k] == ">=" else -1.0
            numerator += lam * sign * z[..., k]
            total += lam
            values = rewards[..., k]
            mean = float(torch.nanmean(values)) if (~torch.isnan(values)).any() else objectives.thresholds[k]
            violations[name] = sign * (objectives.thresholds[k] - mean)  # > 0 while violated
        advantages = numerator / total if total > 0 else numerator
        for name, violation in violations.items():  # dual ascent, after the multipliers were used
            updated = max(0.0, self.lambdas[name] + o.lambda_lr * violation)
            self.lambdas[name] = min(updated, o.lambda_max) if o.lambda_max is not None else updated
        self.last = {f"lambda/{n}": v for n, v in self.lambdas.items()}
        self.last.update({f"constraint_violation/{n}": v for n, v in violations.items()})
        return advantages.masked_fill(all_abstain(rewards), 0.0)

    def metrics(self) -> dict[str, float]:
        """Logged every step: each multiplier (after its update) and each constraint's violation."""
        return dict(self.last)

    def state_dict(self):
        return {"lambdas": dict(self.lambdas)}

    def load_state_dict(self, state):
        self.lambdas = {k: float(v) for k, v in state["lambdas"].items()}


@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("lagrangian", LagrangianOptions, Lagrangian)]
