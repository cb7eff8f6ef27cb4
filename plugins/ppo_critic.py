"""PPO's advantages: a learned critic and GAE, as the ``gae`` normalizer.

    grpo: {kl_coef: 0, num_iterations: 2}                            # the KL goes into the reward instead
    loss: {type: grpo, aggregation: dapo}
    normalizer: {type: gae, gamma: 1.0, lam: 0.95, kl_coef: 0.1}
    sampling: {group_size: 1}                                       # or 2: PPO needs no group

Each completion token gets its own advantage (zenalign.grpo.gae): the scalar reward on the last
token, a per-token KL penalty to the reference (beta = 0.1, PPO's usual, against GRPO's 0.01 in the
loss), the critic's values, and GAE(gamma, lambda), whitened over the batch. The policy then takes
the same clipped step as GRPO (the recipe's ``loss``). After it, the critic, a copy of the policy's
transformer with a value head (or the model at ``model_path``), takes ``epochs`` passes of the
clipped value loss with its own AdamW. The critic and its optimizer are saved with checkpoints.

The critic is a plain torch module replicated on every process (its gradients are summed across
processes), not sharded: ZeRO-3 is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field

from zenalign import NormalizerType, Options, hookimpl
from zenalign.errors import RecipeError
from zenalign.models.critic import ValueModel
from zenalign.models.loading import load_tensors_only
from zenalign.plugins import clipped_value_loss, combine_objectives, gae, kl_estimate, token_rewards, whiten


class GAEOptions(Options):
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount per token (1: none, usual for language).")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda: 1 is the Monte-Carlo return minus the value, "
                       "0 the one-step TD error.")
    kl_coef: float = Field(0.1, ge=0.0, description="beta of the per-token KL penalty to the reference, folded into "
                           "the reward (PPO's usual 0.1). Set grpo.kl_coef to 0 so the KL is not counted twice.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimate in the reward: k1 = "
                                                     "log pi_old - log pi_ref, as InstructGPT.")
    whiten: bool = Field(True, description="Standardise the advantages over the batch's tokens.")
    value_clip: Optional[float] = Field(0.2, gt=0.0, description="Clip range of the value update around the old "
                                        "values; null: the plain squared error.")
    learning_rate: Optional[float] = Field(None, gt=0.0, description="The critic's AdamW learning rate (default: "
                                           "grpo.learning_rate).")
    epochs: int = Field(1, ge=1, description="Passes of the value loss over each batch.")
    model_path: Optional[str] = Field(None, description="The critic's starting model, a local directory (default: "
                                      "model.path, the policy's); its body is loaded, its value head starts at 0.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0.0, description="Gradient clipping of the critic; null: none.")


class GAECritic:
    """PPO advantages from a learned critic and GAE (Schulman et al., arXiv 1707.06347 and 1506.02438;
    for language models Ouyang et al., arXiv 2203.02155)."""

    def __init__(self, options: GAEOptions, context):
        recipe = context.recipe
        if recipe.engine.zero_stage == 3:
            raise RecipeError("the critic is replicated on every process, not sharded; use engine.zero_stage 0-2")
        if recipe.grpo.kl_coef > 0 and options.kl_coef > 0:
            raise RecipeError(f"kl_coef ({options.kl_coef}) puts the KL penalty into the reward; set grpo.kl_coef to 0 "
                              f"(it is {recipe.grpo.kl_coef}) so the KL is not counted twice, or set this kl_coef to 0")
        path = options.model_path or recipe.model.path
        if path is None:
            raise RecipeError("model_path: give the critic's starting model (a local directory); the policy was "
                              "handed over as an object, so its directory is not known")
        self.options = options
        self.reference_kl_coef = options.kl_coef
        self.device = context.device or torch.device("cpu")
        self.micro_batch_size = recipe.engine.micro_batch_size
        self.trust_remote_code = recipe.model.trust_remote_code
        self.path, self.field = context.resolve_path(path), "normalizer.model_path" if options.model_path else "model.path"
        self.learning_rate, self.betas = options.learning_rate or recipe.grpo.learning_rate, tuple(recipe.grpo.adam_betas)
        self._critic: Optional[ValueModel] = None  # loaded on first use: `zenalign validate` builds this too
        self._batch: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._metrics: dict[str, float] = {}

    @property
    def critic(self) -> ValueModel:
        if self._critic is None:
            self._critic = ValueModel.load(self.path, self.field, self.trust_remote_code).to(self.device)
            self.optimizer = torch.optim.AdamW([p for p in self._critic.parameters() if p.requires_grad],
                                               lr=self.learning_rate, betas=self.betas, weight_decay=0.0)
        return self._critic

    def rows(self, n: int) -> list[slice]:
        size = self.micro_batch_size or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    @torch.no_grad()
    def values(self, tokens) -> torch.Tensor:
        return torch.cat([self.critic.values(tokens.sequences[r], tokens.attention_mask[r], tokens.prompt_length)
                          for r in self.rows(tokens.sequences.shape[0])])

    def token_advantages(self, tokens, rewards, objectives, context) -> torch.Tensor:
        """Per-token advantages ``(N, Tc)``. A completion's reward is the weighted sum of its objectives,
        an objective it abstained on filled with this batch's mean of that objective; a completion
        that abstained on every objective gets no advantage and does not train the critic."""
        n, k = rewards.shape
        scalar = combine_objectives(rewards.view(1, n, k), objectives.weights).view(n)  # (N,) the batch as one group
        scored = ~torch.isnan(scalar)
        scalar = scalar.nan_to_num(0.0)
        mask = tokens.completion_mask.to(torch.float64).cpu() * scored.unsqueeze(1)
        kl = None
        if tokens.ref_logp is not None and self.options.kl_coef > 0:
            kl = kl_estimate(tokens.logp.double(), tokens.ref_logp.double(), self.options.kl_estimator).cpu()
        values = self.values(tokens).double().cpu()                                       # (N, Tc)
        advantages, returns = gae(token_rewards(scalar, mask, kl, self.options.kl_coef), values, mask,
                                  self.options.gamma, self.options.lam)
        sums = all_sums(context)
        self._batch = (values, returns, mask)
        count, value_sum, return_sum, kl_sum = sums([float(mask.sum()), float((values * mask).sum()),
                                                     float((returns * mask).sum()),
                                                     float((kl * mask).sum()) if kl is not None else 0.0])
        self._metrics = {"critic/value_mean": value_sum / max(count, 1.0), "critic/return_mean": return_sum / max(count, 1.0),
                         "critic/kl_in_reward": kl_sum / max(count, 1.0)}
        if self.options.whiten:
            advantages = whiten(advantages, mask, sums)
        return advantages.to(torch.float32).to(tokens.completion_mask.device)

    def train_critic(self, tokens, context) -> None:
        """``epochs`` passes of the clipped value loss, a token mean over every process's batch."""
        old_values, returns, mask = (t.to(self.device, torch.float32) for t in self._batch)
        sums = all_sums(context)
        (total,) = sums([float(mask.sum())])
        loss_sum = clipped_sum = 0.0
        for _ in range(self.options.epochs):
            for r in self.rows(mask.shape[0]):
                v = self.critic.values(tokens.sequences[r], tokens.attention_mask[r], tokens.prompt_length)
                loss, clipped = clipped_value_loss(v, old_values[r], returns[r], self.options.value_clip)
                (loss * mask[r]).sum().div(max(total, 1.0)).backward()
                loss_sum += float((loss.detach() * mask[r]).sum())
                clipped_sum += float((clipped * mask[r]).sum())
            self._step(context)
        loss_sum, clipped_sum = sums([loss_sum, clipped_sum])
        residual = (returns - old_values) * mask
        res_sum, res_sq, ret_sum, ret_sq = sums([float(residual.sum()), float((residual ** 2).sum()),
                                                 float((returns * mask).sum()), float((returns ** 2 * mask).sum())])
        count = max(total, 1.0)
        res_var, ret_var = res_sq / count - (res_sum / count) ** 2, ret_sq / count - (ret_sum / count) ** 2
        self._metrics.update({"critic/value_loss": loss_sum / count / self.options.epochs,
                              "critic/value_clip_frac": clipped_sum / count / self.options.epochs,
                              # 1 - Var(G - V_old) / Var(G), of the values the advantages used
                              "critic/explained_variance": 1.0 - res_var / ret_var if ret_var > 0 else 0.0})

    def _step(self, context) -> None:
        params = [p for p in self.critic.parameters() if p.grad is not None]
        if context.world_size > 1:  # the loss is already a mean over every process's tokens: sum the gradients
            for p in params:
                torch.distributed.all_reduce(p.grad)
        if self.options.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.options.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def save_state(self, directory: Path) -> None:
        self.critic.save(directory / "critic")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        """The checkpoint's critic and optimizer (read with ``weights_only``: no pickled code runs)."""
        self._critic = ValueModel.load(directory / "critic", "--resume (critic)", self.trust_remote_code,
                                       fresh_head=False).to(self.device)
        self.optimizer = torch.optim.AdamW([p for p in self._critic.parameters() if p.requires_grad],
                                           lr=self.learning_rate, betas=self.betas, weight_decay=0.0)
        self.optimizer.load_state_dict(load_tensors_only(directory / "optimizer.pt", self.device))


def all_sums(context):
    """Sum a list of floats over every process (the run context's row gather)."""
    def sums(values: list[float]) -> list[float]:
        if context is None or context.world_size == 1:
            return list(values)
        return context.gather_rows(torch.tensor([values], dtype=torch.float64)).sum(0).tolist()
    return sums


@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("gae", GAEOptions, GAECritic, min_group_size=1,
                           description="PPO: per-token advantages from a learned critic and GAE, the KL in the reward "
                           "(arXiv 1707.06347, 1506.02438).")]
