"""The update phase: mu optimizer steps on one batch of generations, each over all its
micro-batches, with the loss normalised over the whole (global) batch.

Old log-probs are computed once per generation, and only when mu > 1: with mu = 1 the policy has
not moved yet, so the detached current log-probs are exactly pi_old and that pass is skipped
(unless ``grpo.top_entropy_quantile`` needs pi_old's entropies for the whole batch first).
The policy's per-token entropy is logged from the logits the first pass over the batch computes
anyway: no extra forward pass.
Under several processes each rank's loss uses global token counts and is scaled by the world
size (the engines average gradients), so the update equals the single-process one.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from zenalign.errors import NonFiniteError, PluginError, RecipeError
from zenalign.grpo.importance import importance_weights
from zenalign.models.logprobs import completion_logprobs, update_pass_kind
from zenalign.plugins.losses import high_entropy_tokens
from zenalign.plugins import PolicyLoss, TokenLoss
from zenalign.generation.rollout import Rollout
from zenalign.models.lora import adapters_off, forward_module, is_adapted
from zenalign.recipe.schema import EngineSection, GRPOSection, Recipe, SamplingSection
from zenalign.train.batch import StepBatch
from zenalign.train.distributed import Dist


def rows_that_move(batches: list[slice], advantages: torch.Tensor,
                   mask: torch.Tensor) -> tuple[list[slice | torch.Tensor], float]:
    """The micro-batches with the completions whose advantage is exactly zero left out, and how
    many completion tokens those held.

    Without a KL term and with pi_old the current policy (mu = 1), such a completion's per-token
    loss is ``-min(1 * 0, clip(1) * 0) = 0`` with a zero gradient: leaving it out of the forward
    and backward pass changes neither the loss nor the gradient (the token weights are computed
    from the whole batch first). A group whose completions all earned the same reward is all
    zeros under the group normalizers. Each micro-batch keeps at least its first row, so every
    micro-batch still runs a backward pass: ranks under DDP or DeepSpeed stay in step, and every
    parameter gets a gradient (zero where nothing moved), so the optimizer step is the same too.
    """
    kept, skipped_tokens = [], 0.0
    for rows in batches:
        moving = (advantages[rows] != 0).reshape(rows.stop - rows.start, -1).any(dim=1)  # (n,): per-token ones too
        if bool(moving.all()):
            kept.append(rows)
            continue
        moving[0] = True
        index = torch.arange(rows.start, rows.stop, device=advantages.device)[moving]
        skipped_tokens += float(mask[rows][~moving].sum())
        kept.append(index)
    return kept, skipped_tokens


class PolicyUpdate:
    """Log-prob passes and the clipped policy step, built once per run from the recipe.

    ``reference`` is the frozen KL reference; ``base_reference`` says that the policy has LoRA
    adapters and the reference is the policy with them switched off (no second copy of the weights).
    """

    def __init__(self, grpo: GRPOSection, sampling: SamplingSection, settings: EngineSection, engine: Any, dist: Dist,
                 loss: PolicyLoss, loss_name: str, reference: Optional[torch.nn.Module] = None,
                 base_reference: bool = False):
        self.engine = engine
        self.dist = dist
        self.loss = loss
        self.loss_name = loss_name
        self.reference = reference
        self.base_reference = base_reference
        self.num_iterations = grpo.num_iterations
        self.top_entropy_quantile = grpo.top_entropy_quantile
        self.micro_batch_size = settings.micro_batch_size
        self.skip_zero_advantage = settings.skip_zero_advantage
        self.share_prompts = settings.shared_prompts
        self.lean_forward = settings.lean_forward
        self.on_nonfinite = settings.on_nonfinite
        self.temperature = sampling.temperature
        correction = sampling.vllm_is_correction
        self.correction = ((correction.mode, correction.cap) if sampling.decoder == "vllm" or sampling.lag
                           else ("off", 1.0))
        self.sampler_stats: list = []  # this call's ISStats, one per micro-batch pass over vLLM samples

    @classmethod
    def from_recipe(cls, recipe: Recipe, engine: Any, dist: Dist, loss: PolicyLoss, **kwargs: Any) -> "PolicyUpdate":
        """The update a recipe describes, with the loss built from its ``loss`` section."""
        name = getattr(recipe.loss, "type", type(loss).__name__)
        return cls(recipe.grpo, recipe.sampling, recipe.engine, engine, dist, loss, name, **kwargs)

    def micro_batches(self, n: int) -> list[slice]:
        size = self.micro_batch_size or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or self.base_reference

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Log-probs ``(N, Tc)`` of the sampled tokens under the KL reference."""
        if self.reference is not None:
            return self.logprobs(self.reference, rollout)
        model = self.engine.model
        was_training = model.training
        model.eval()  # the base model as a frozen reference: no dropout
        try:
            with adapters_off(model):
                return self.logprobs(model, rollout)
        finally:
            model.train(was_training)

    def reset_reference(self, zero_stage: int) -> bool:
        """Copy the policy's weights into the reference; False when there is no KL term."""
        if self.base_reference or is_adapted(self.engine.model):
            raise RecipeError("resetting the reference policy is not supported with model.lora (the reference is the "
                              "adapter-free base model, or a model without adapters); turn the reset off")
        if self.reference is None:
            return False
        if zero_stage == 3:
            raise RecipeError("resetting the reference policy is not supported at ZeRO stage 3; use stage 0-2")
        self.reference.load_state_dict({k: v.detach() for k, v in self.engine.model.state_dict().items()})
        return True

    def forward(self, model: torch.nn.Module, rollout: Rollout, rows: slice | torch.Tensor, entropy: bool = False):
        """Log-probs ``(n, Tc)`` of the sampled tokens of ``rows`` under ``model``, at the sampling
        temperature; with ``entropy``, also the policy's entropy at each position ``(n, Tc)``.
        Every pass (the update's, pi_old's, the reference's) runs as the update's model does
        (:func:`~zenalign.models.logprobs.update_pass_kind`): on equal weights they give equal
        log-probs to the bit, so a step with no learning signal has a gradient of exactly 0."""
        lean, share = update_pass_kind(forward_module(self.engine.train_model), self.lean_forward, self.share_prompts)
        with self.engine.autocast():
            return completion_logprobs(forward_module(model), rollout.sequences[rows], rollout.attention_mask[rows],
                                       rollout.prompt_length, self.temperature, share_prompts=share, lean=lean,
                                       entropy=entropy)

    def old_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """pi_old's log-probs ``(N, Tc)``: the policy before this step's update, as the update's
        passes see it (dropout included)."""
        self.engine.train_model.train()
        return self.logprobs(self.engine.train_model, rollout)

    @torch.no_grad()
    def logprobs(self, model: torch.nn.Module, rollout: Rollout, entropy: bool = False):
        """Log-probs ``(N, Tc)`` of the sampled tokens under ``model`` (no gradient), micro-batched;
        with ``entropy``, also the entropies ``(N, Tc)``."""
        parts = [self.forward(model, rollout, rows, entropy) for rows in self.micro_batches(len(rollout))]
        if not entropy:
            return torch.cat(parts)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def entropy_mask(self, entropy: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """:func:`high_entropy_tokens` over the completion tokens of every process."""
        values = entropy[mask.bool()].float().cpu()
        everything = torch.cat(self.dist.gather_objects([values])) if self.dist.active else values
        return high_entropy_tokens(entropy, everything, self.top_entropy_quantile)

    def policy_loss(self, rollout: Rollout, rows: slice | torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                    old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                    mask: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None,
                    entropy: bool = False) -> tuple[torch.Tensor, TokenLoss]:
        """This micro-batch's share of the batch loss, with gradient, and its per-token terms.
        ``old_logp=None`` means pi_old is the current policy (mu = 1); ``mask`` is the batch's loss
        mask ``(N, Tc)`` (default: the policy's tokens, ``Rollout.policy_token_mask``); ``keep`` ``(N, Tc)`` restricts the
        policy-gradient term to high-entropy tokens; with ``entropy`` the policy's entropies come back in
        ``TokenLoss.entropy``."""
        out = self.forward(self.engine.train_model, rollout, rows, entropy)
        logp, ent = out if entropy else (out, None)                                    # (n, Tc) each
        old = old_logp[rows] if old_logp is not None else logp.detach()                # (n, Tc)
        ref = ref_logp[rows] if ref_logp is not None else None                         # (n, Tc) or None
        mask = (mask if mask is not None else rollout.policy_token_mask)[rows]
        weights = weights[rows]                                                        # (n, Tc)
        if rollout.sampler_logp is not None:  # sampled by vLLM: pi_old / pi_vllm, bounded (zenalign.grpo.importance)
            correction, stats = importance_weights(old, rollout.sampler_logp[rows], mask, *self.correction)
            weights = weights * correction
            self.sampler_stats.append(stats)
        token = self.loss.per_token(logp, old, advantages[rows], ref_logp=ref, mask=mask)
        loss = token.loss
        if keep is not None:
            if token.policy is None:
                raise PluginError(f"policy loss '{self.loss_name}' does not report its policy-gradient term "
                                  f"(TokenLoss.policy), which grpo.top_entropy_quantile masks; set it to 1")
            loss = loss - token.policy * (1.0 - keep[rows])                            # PG term on kept tokens only
        token.entropy = ent
        return (loss * weights).sum(), token                                           # () this micro-batch's share

    def __call__(self, batch: StepBatch) -> dict[str, float]:
        """mu optimizer steps on this batch: its advantages, ``(N,)`` one per completion or
        ``(N, Tc)`` one per token, over its loss mask (the policy's tokens of the completions that
        count); its reference log-probs for the KL term, and its pi_old when the normalize phase
        computed it and mu > 1. Returns this rank's sums (loss, and KL/clip/ratio over its tokens)
        per pass, averaged over passes, its token count, and its entropy sum and the tokens that
        sum covers."""
        world, rollout, ref_logp = self.dist.world_size, batch.rollout, batch.ref_logp
        old_logp = batch.old_logp if self.num_iterations > 1 else None  # mu = 1: the update's own pass is pi_old
        self.engine.train_model.train()
        policy_mask = batch.policy_mask                                                # (N, Tc)
        mask = batch.loss_mask                                                         # (N, Tc)
        advantages = batch.advantages.to(mask.device)  # rewards are scored on the CPU; the loss runs where the model does
        local_tokens = float(mask.sum())
        weights = self.loss.token_weights(mask, num_sequences=len(rollout) * world,
                                          num_tokens=self.dist.sum([local_tokens])[0])  # (N, Tc)
        sums = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "ratio": 0.0, "grad_norm": 0.0}
        self.sampler_stats = []
        keep = None
        entropy = {"entropy": 0.0, "entropy_tokens": 0.0}
        if self.top_entropy_quantile < 1.0 or (old_logp is None and self.num_iterations > 1):  # pi_old's pass
            pre_logp, old_entropy = self.logprobs(self.engine.train_model, rollout, entropy=True)
            self._add_entropy(entropy, old_entropy, policy_mask)  # every sampled token, in the loss or not
            if self.top_entropy_quantile < 1.0:
                keep, entropy["entropy_threshold"] = self.entropy_mask(old_entropy, mask)
            if old_logp is None and self.num_iterations > 1:  # mu = 1: the update's own detached pass is pi_old
                old_logp = pre_logp
        batches = self.micro_batches(len(rollout))
        if (self.skip_zero_advantage and self.loss.skips_zero_advantage_rows and old_logp is None
                and ref_logp is None):
            batches, skipped_tokens = rows_that_move(batches, advantages, mask)
            sums["ratio"] += skipped_tokens  # pi = pi_old on every skipped token: a ratio of exactly 1, never clipped
        skipped = 0
        lr = self.engine.learning_rate  # the rate this step's (first) optimizer step uses: logged as such
        for iteration in range(self.num_iterations):
            before = dict(sums)
            measure = iteration == 0 and not entropy["entropy_tokens"]
            for i, rows in enumerate(batches):
                with self.engine.micro_batch(last=i == len(batches) - 1):
                    loss, token = self.policy_loss(rollout, rows, advantages, weights, old_logp, ref_logp, mask,
                                                   keep=keep, entropy=measure)
                    self.engine.backward(loss * world)  # processes' gradients are averaged; this makes them sum
                self._add_token_sums(sums, loss, token, mask[rows])
                if token.entropy is not None:
                    self._add_entropy(entropy, token.entropy, policy_mask[rows])
            skipped += self._check_finite(sums, before, self.engine.optimizer_step(), iteration, batch.step)
        passes = max(self.num_iterations - skipped, 1)
        out = {key: value / self.num_iterations for key, value in sums.items()} | {"tokens": local_tokens, "lr": lr} | entropy
        out |= {f"sampler_{name}": sum(getattr(s, name) for s in self.sampler_stats) / self.num_iterations
                for name in ("abs_diff", "tokens", "capped", "units")} if self.sampler_stats else {}
        out["grad_norm"] = sums["grad_norm"] / passes if skipped < self.num_iterations else float("nan")
        return out | ({"nonfinite_skipped": float(skipped)} if self.on_nonfinite == "skip" else {})

    @staticmethod
    def _add_entropy(sums: dict[str, float], ent: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.to(ent.dtype)
        sums["entropy"] += float((ent * m).sum())
        sums["entropy_tokens"] += float(m.sum())

    def _check_finite(self, sums: dict[str, float], before: dict[str, float], norm: float, iteration: int,
                      step: int) -> int:
        """After an optimizer step (which the engine does not take on a non-finite gradient): add the
        grad norm and return 0, or, with a NaN or infinite loss or norm, stop the run
        (``engine.on_nonfinite: stop``) or forget the pass and return 1 (``skip``)."""
        pass_loss = sums["loss"] - before["loss"]
        if math.isfinite(norm) and math.isfinite(pass_loss):
            sums["grad_norm"] += norm
            return 0
        if self.on_nonfinite == "skip":
            sums.update(before)  # the dropped pass leaves no trace in the metrics
            return 1
        quantity, value = ("gradient norm", norm) if math.isfinite(pass_loss) else ("loss", pass_loss)
        raise NonFiniteError(
            f"step {step}: the {quantity} is {value} (pass {iteration + 1} of {self.num_iterations}); nothing was "
            f"stepped or saved from it. Lower grpo.learning_rate, set engine.max_grad_norm, or drop such steps with "
            f"engine.on_nonfinite: skip")

    @staticmethod
    def _add_token_sums(sums: dict[str, float], loss: torch.Tensor, token: TokenLoss, mask: torch.Tensor) -> None:
        m = mask.to(token.loss.dtype)
        sums["loss"] += float(loss.detach())
        sums["clip"] += float((token.clipped.detach() * m).sum())
        sums["ratio"] += float((token.ratio.detach() * m).sum())
        if token.kl is not None:
            sums["kl"] += float((token.kl.detach() * m).sum())
