"""The GRPO loss computed the plain way, one unpadded sequence at a time, to check zenalign's
batched path before the benchmark times it.

For completion i with tokens o_i (up to and including EOS), advantage A_i and sampled-token
log-probs under the policy (logp) and the sampling policy (old):

    loss = 1/B sum_i 1/|o_i| sum_t -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i),  rho_t = exp(logp_t - old_t)

(beta = 0 in the benchmark, so no KL term.) No padding, no position-id arithmetic, no
logits_to_keep, no autocast: a full fp32 forward pass of each prompt + completion on its own.
"""

from __future__ import annotations

import torch

from zenalign.generation.gumbel import completion_keys
from zenalign.plugins.losses import token_weights


def sequences_of(rollout) -> list[tuple[list[int], list[int]]]:
    """(prompt ids without padding, completion ids up to and including EOS) per row."""
    tp = rollout.prompt_length
    out = []
    for row, mask, cmask in zip(rollout.sequences, rollout.attention_mask, rollout.completion_mask):
        prompt = row[:tp][mask[:tp].bool()].tolist()
        completion = row[tp:][cmask.bool()].tolist()
        out.append((prompt, completion))
    return out


def plain_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0].float()
    logits = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1] / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion, device=ids.device).unsqueeze(-1)).squeeze(-1)


def plain_loss(logps: list[torch.Tensor], olds: list[torch.Tensor], advantages: torch.Tensor, eps: float) -> float:
    total = 0.0
    for logp, old, adv in zip(logps, olds, advantages.tolist()):
        ratio = torch.exp(logp - old)
        per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
        total += float(per_token.mean())
    return total / len(logps)


def flat_grad(model) -> torch.Tensor:
    """Every parameter's gradient in one vector (zeros where there is none), and clear them."""
    grads = [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads).float()


def plain_gradient(model, pairs, olds, advantages: torch.Tensor, eps: float, temperature: float) -> torch.Tensor:
    """The gradient of :func:`plain_loss`, one sequence's forward and backward at a time (so no
    graph for the whole batch is ever held). ``olds=None`` means pi_old = pi (mu = 1)."""
    model.zero_grad(set_to_none=True)
    for i, ((prompt, completion), adv) in enumerate(zip(pairs, advantages.tolist())):
        logp = plain_logprobs(model, prompt, completion, temperature)
        old = logp.detach() if olds is None else olds[i]
        ratio = torch.exp(logp - old)
        per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
        (per_token.mean() / len(pairs)).backward()
    return flat_grad(model)


def check_loss(trainer, records: list[dict], rtol: float | None = None) -> dict:
    """Compare ``trainer.updater.policy_loss`` on one sampled batch with :func:`plain_loss`: once with
    pi_old = pi (mu = 1, the benchmark's setting) and once with pi_old shifted so that clipping is
    active on both sides; the loss values, the log-probs, and the loss's gradient with respect to
    every parameter (at pi_old = pi the loss's value is the same whatever the log-probs are, its
    gradient is not). Raises AssertionError when they differ beyond the tolerance (1e-4 relative
    in fp32; 3e-2 under bf16 autocast, whose log-probs carry bf16 rounding; the gradient 2e-3
    and 1e-1)."""
    with torch.no_grad():  # values only: a graph kept alive here would also inflate the benchmark's peak RSS
        values = _check_values(trainer, records, rtol)
    values.update(_check_gradients(trainer, values.pop("batch")))
    return values


def _check_values(trainer, records: list[dict], rtol: float | None) -> dict:
    recipe = trainer.recipe
    if rtol is None:
        rtol = 3e-2 if recipe.engine.precision == "bf16" else 1e-4
    eps = recipe.loss.clip_epsilon
    group = recipe.sampling.group_size
    keys = completion_keys(recipe.run.seed + 1, 0, 0, len(records) * group)
    rollout = trainer.sample(records, keys)
    n = len(rollout)
    device = rollout.sequences.device  # the trainer's (the draws below are made on the CPU, so they match on any device)
    advantages = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    weights = token_weights(rollout.completion_mask, "grpo", recipe.sampling.max_new_tokens)
    model = trainer.engine.model
    pairs = sequences_of(rollout)
    logps = [plain_logprobs(model, p, c, recipe.sampling.temperature) for p, c in pairs]
    rows = slice(0, n)

    zen, _ = trainer.updater.policy_loss(rollout, rows, advantages, weights, None, None)
    ref = plain_loss(logps, logps, advantages, eps)

    shift = torch.Generator().manual_seed(1)
    olds = [lp + 0.6 * (torch.rand(lp.shape, generator=shift) - 0.5).to(device) for lp in logps]
    old_padded = torch.zeros_like(rollout.completion_mask, dtype=torch.float32)
    for i, old in enumerate(olds):
        old_padded[i, : len(old)] = old
    zen_clipped, token = trainer.updater.policy_loss(rollout, rows, advantages, weights, old_padded, None)
    ref_clipped = plain_loss(logps, olds, advantages, eps)
    clip_frac = float((token.clipped * rollout.completion_mask).sum() / rollout.completion_mask.sum())

    ref_padded = torch.zeros_like(old_padded)
    for i, lp in enumerate(logps):
        ref_padded[i, : len(lp)] = lp
    _, same = trainer.updater.policy_loss(rollout, rows, advantages, weights, ref_padded, None)  # ratio = exp(zen - plain)
    logp_diff = float((torch.log(same.ratio.detach()).abs() * rollout.completion_mask).max())
    zen, zen_clipped = float(zen.detach()), float(zen_clipped.detach())
    for name, a, b in (("mu=1", zen, ref), ("clipped", zen_clipped, ref_clipped)):
        assert abs(a - b) <= rtol * max(abs(b), 1e-3), f"loss check ({name}): zenalign {a:.8f} vs plain reference {b:.8f}"
    assert clip_frac > 0.05, f"the clipped check clipped only {clip_frac:.1%} of tokens"
    logp_limit = 1e-1 if recipe.engine.precision == "bf16" else 1e-3
    assert logp_diff <= logp_limit, f"loss check: a per-token log-prob differs from the plain reference by {logp_diff:.2e}"
    return {"zenalign": float(zen), "reference": ref, "zenalign_clipped": float(zen_clipped), "reference_clipped": ref_clipped,
            "clip_frac": clip_frac, "rtol": rtol, "rows": n, "max_logp_diff": logp_diff,
            "shared_prompts": recipe.engine.shared_prompts, "lean_forward": recipe.engine.lean_forward,
            "batch": (rollout, advantages, weights, pairs, olds, old_padded)}


def _check_gradients(trainer, batch) -> dict:
    """The gradient of ``trainer.updater.policy_loss`` against :func:`plain_gradient`, at pi_old = pi and
    with the shifted pi_old; relative difference of the whole gradient vector. Under bf16 both run
    the engine's autocast (a float32 reference differs by bf16's rounding, which grows with depth:
    0.10 relative at the 30-layer 135m shape)."""
    rollout, advantages, weights, pairs, olds, old_padded = batch
    recipe = trainer.recipe
    model = trainer.engine.model
    tolerance = 1e-1 if recipe.engine.precision == "bf16" else 2e-3
    rows = slice(0, len(rollout))
    out = {}
    for name, old, old_list in (("mu=1", None, None), ("clipped", old_padded, olds)):
        model.zero_grad(set_to_none=True)
        loss, _ = trainer.updater.policy_loss(rollout, rows, advantages, weights, old, None)
        loss.backward()
        del loss
        zen = flat_grad(model)
        with trainer.engine.autocast():  # under bf16 the reference runs the same autocast: only batching differs
            ref = plain_gradient(model, pairs, old_list, advantages, recipe.loss.clip_epsilon,
                                 recipe.sampling.temperature)
        diff = float((zen - ref).norm() / ref.norm().clamp(min=1e-12))
        assert float(ref.norm()) > 0, "gradient check: the reference gradient is zero"
        assert diff <= tolerance, f"gradient check ({name}): zenalign's gradient is {diff:.2e} (relative) from the plain reference's"
        out[f"grad_rel_diff_{'mu1' if old is None else 'clipped'}"] = diff
    return out
