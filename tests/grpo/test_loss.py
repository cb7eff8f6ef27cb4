"""The clipped surrogate, the KL estimators and loss aggregation on hand-built tensors, with
values and gradients worked out by hand."""

import math
from pathlib import Path

import pytest
import torch

from zenalign.plugins.losses import GRPOLoss, kl_estimate, token_weights
from zenalign.recipe.loader import validate_recipe


def one_token(ratio, advantage, clip_low=0.2, clip_high=0.2):
    """Loss and d(loss)/d(logp) for one token whose ratio to pi_old is `ratio`."""
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    out = GRPOLoss(clip_low, clip_high).per_token(logp, old, torch.tensor([advantage], dtype=torch.float64))
    out.loss.sum().backward()
    return out.loss.item(), logp.grad.item(), out.clipped.item()


# d/dlogp of -rho*A is -rho*A (rho = exp(logp - old)); a clipped term has zero gradient.
@pytest.mark.parametrize(
    "ratio, advantage, loss, grad, clipped",
    [
        (1.1, +1.0, -1.1, -1.1, 0.0),  # A > 0, inside the range: -rho*A
        (1.5, +1.0, -1.2, 0.0, 1.0),  # A > 0, above 1+eps: clipped to -(1.2)*A, no gradient
        (0.5, +1.0, -0.5, -0.5, 0.0),  # A > 0, below 1-eps: min keeps the unclipped (pessimistic) term
        (0.9, -1.0, 0.9, 0.9, 0.0),  # A < 0, inside
        (0.5, -1.0, 0.8, 0.0, 1.0),  # A < 0, below 1-eps: clipped to -(0.8)*A, no gradient
        (1.5, -1.0, 1.5, 1.5, 0.0),  # A < 0, above 1+eps: unclipped term is the min, gradient flows
        (1.3, 0.0, 0.0, 0.0, 0.0),  # A = 0: no loss, no gradient
    ],
)
def test_clipped_surrogate(ratio, advantage, loss, grad, clipped):
    got_loss, got_grad, got_clipped = one_token(ratio, advantage)
    assert got_loss == pytest.approx(loss, abs=1e-12)
    assert got_grad == pytest.approx(grad, abs=1e-12)
    assert got_clipped == clipped


def test_clip_higher_is_asymmetric():
    # DAPO clip-higher: eps_low 0.2, eps_high 0.28. rho = 1.25 is inside [0.8, 1.28] ...
    assert one_token(1.25, 1.0, 0.2, 0.28)[:2] == pytest.approx((-1.25, -1.25))
    # ... but would be clipped with the symmetric 0.2
    assert one_token(1.25, 1.0, 0.2, 0.2)[:2] == pytest.approx((-1.2, 0.0))
    # the low side is unaffected by eps_high: rho 0.7, A < 0 is clipped at 0.8
    assert one_token(0.7, -1.0, 0.2, 0.28)[:2] == pytest.approx((0.8, 0.0))


def test_k3_kl_value_and_gradient():
    # pi = 0.5, pi_ref = 0.25: x = log(pi_ref/pi) = log 0.5
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    kl = kl_estimate(logp, ref, "k3")
    # k3 = 0.5 - log 0.5 - 1 = 0.193147...
    assert kl.item() == pytest.approx(0.5 - math.log(0.5) - 1.0, abs=1e-12)
    kl.sum().backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - pi_ref/pi = 0.5
    assert logp.grad.item() == pytest.approx(0.5, abs=1e-12)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2), abs=1e-12)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2, abs=1e-12)
    # k3 is zero exactly when the policies agree, and never negative
    same = torch.tensor([[-1.3]], dtype=torch.float64)
    assert kl_estimate(same, same, "k3").item() == 0.0
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    assert (kl_estimate(torch.zeros_like(x), x, "k3") >= 0).all()


def test_kl_penalty_adds_to_the_surrogate():
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    out = GRPOLoss(0.2, 0.2, kl_coef=0.1).per_token(logp, logp.detach(), torch.tensor([2.0], dtype=torch.float64), ref_logp=ref)
    # ratio 1: surrogate -A = -2; plus 0.1 * k3
    k3 = 0.5 - math.log(0.5) - 1.0
    assert out.loss.item() == pytest.approx(-2.0 + 0.1 * k3, abs=1e-12)
    out.loss.sum().backward()
    # d/dlogp: -rho*A + 0.1 * (1 - pi_ref/pi) = -2 + 0.05
    assert logp.grad.item() == pytest.approx(-1.95, abs=1e-12)
    assert out.kl.item() == pytest.approx(k3, abs=1e-12)


# ---------------------------------------------------------------------------------------- aggregation

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])  # completions of 3 and 1 tokens
LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])  # 100 = masked, must not count


@pytest.mark.parametrize(
    "aggregation, expected, weights",
    [
        # mean per completion, then over completions: (mean(1,2,3) + 4) / 2 = 3
        ("grpo", 3.0, [[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]]),
        # all tokens together: (1 + 2 + 3 + 4) / 4 = 2.5
        ("dapo", 2.5, [[1 / 4, 1 / 4, 1 / 4, 0], [1 / 4, 0, 0, 0]]),
        # constant normaliser B * max_new_tokens = 2 * 4: 10 / 8 = 1.25
        ("dr_grpo", 1.25, [[1 / 8, 1 / 8, 1 / 8, 0], [1 / 8, 0, 0, 0]]),
    ],
)
def test_aggregation(aggregation, expected, weights):
    w = token_weights(MASK, aggregation, max_new_tokens=4)
    assert (w * LOSS).sum().item() == pytest.approx(expected)
    # the gradient of the aggregated loss with respect to each token's loss is its weight
    per_token = LOSS.clone().requires_grad_(True)
    (w * per_token).sum().backward()
    assert per_token.grad.tolist() == [pytest.approx(row) for row in weights]


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_sum_to_the_full_batch_loss(aggregation):
    # Weights are computed once for the whole batch, so micro-batch losses add up exactly.
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 5, generator=generator) > 0.3).long()
    mask[:, 0] = 1
    loss = torch.randn(6, 5, generator=generator)
    w = token_weights(mask, aggregation, max_new_tokens=5)
    full = (w * loss).sum()
    parts = sum((w[s] * loss[s]).sum() for s in (slice(0, 2), slice(2, 5), slice(5, 6)))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_global_counts_for_several_processes():
    # Two ranks of one row each: with global counts, averaging the ranks' losses gives the
    # single-process loss (rank losses are summed by gradient averaging times world size).
    single = (token_weights(MASK, "dapo", 4) * LOSS).sum()
    ranks = [(token_weights(MASK[i : i + 1], "dapo", 4, num_sequences=2, num_tokens=4) * LOSS[i : i + 1]).sum() for i in (0, 1)]
    assert sum(ranks).item() == pytest.approx(single.item())
    single = (token_weights(MASK, "grpo", 4) * LOSS).sum()
    ranks = [(token_weights(MASK[i : i + 1], "grpo", 4, num_sequences=2) * LOSS[i : i + 1]).sum() for i in (0, 1)]
    assert sum(ranks).item() == pytest.approx(single.item())


# ---------------------------------------------------------------------------------------- mu > 1

def test_second_pass_ratio_departs_from_one_and_clips():
    """mu = 2 by hand: a one-parameter policy over two tokens, logits [theta, 0], token 0 sampled,
    A = +1, eps = 0.2, plain SGD with lr 1.

    pass 1: theta = 0, p = 0.5 = pi_old, ratio 1, loss -1, d/dtheta = -(1 - p) = -0.5 -> theta = 0.5
    pass 2: p = sigmoid(0.5) = 0.622459, ratio p / 0.5 = 1.244919 > 1.2 -> loss -1.2, no gradient
    """
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def logp():
        return torch.log_softmax(torch.stack([theta, torch.zeros_like(theta)]), 0)[0].reshape(1, 1)

    old = logp().detach()  # computed once, before the first pass
    advantage = torch.tensor([1.0], dtype=torch.float64)
    loss = GRPOLoss(0.2, 0.2)
    out = loss.per_token(logp(), old, advantage)
    out.loss.sum().backward()
    assert (out.ratio.item(), out.loss.item(), theta.grad.item()) == pytest.approx((1.0, -1.0, -0.5))
    with torch.no_grad():
        theta -= theta.grad
        theta.grad = None
    out = loss.per_token(logp(), old, advantage)
    p = 1 / (1 + math.exp(-0.5))
    assert out.ratio.item() == pytest.approx(p / 0.5, abs=1e-12)
    assert out.loss.item() == pytest.approx(-1.2, abs=1e-12)
    assert out.clipped.item() == 1.0
    out.loss.sum().backward()
    assert theta.grad.item() == 0.0


# ---------------------------------------------------------------------------------------- GRPOLoss

def test_calling_the_loss_gives_the_weighted_sum_of_the_per_token_losses():
    """Two completions, A = +1 and -1, eps 0.2, beta 0.1, k3, pi_ref / pi = 0.5 on every token.

    row 0 (A = +1): ratios 1.1 (inside) and 1.5 (clipped to 1.2): surrogates -1.1, -1.2
    row 1 (A = -1): ratios 0.9 (inside) and 0.5 (clipped to 0.8): surrogates 0.9, 0.8
    k3 = 0.5 - log 0.5 - 1 on every token, so each token's loss gains 0.1 * k3.
    weights [[1/4, 1/4], [1/2, 0]] (grpo, the second completion one token long):
    (-1.1 - 1.2) / 4 + 0.9 / 2 + 0.1 * k3 * (1/4 + 1/4 + 1/2) = -0.125 + 0.1 * k3
    """
    logp = torch.log(torch.tensor([[1.1, 1.5], [0.9, 0.5]], dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros(2, 2, dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    weights = torch.tensor([[0.25, 0.25], [0.5, 0.0]], dtype=torch.float64)
    ref = logp.detach() + math.log(0.5)
    k3 = 0.5 - math.log(0.5) - 1.0
    grpo_loss = GRPOLoss(0.2, 0.2, kl_coef=0.1)

    loss, token = grpo_loss(logp, old, advantages, weights, ref)

    assert loss.item() == pytest.approx(-0.125 + 0.1 * k3, abs=1e-12)
    assert token.loss.tolist() == [pytest.approx([-1.1 + 0.1 * k3, -1.2 + 0.1 * k3], abs=1e-12),
                                   pytest.approx([0.9 + 0.1 * k3, 0.8 + 0.1 * k3], abs=1e-12)]
    assert token.clipped.tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert token.kl.tolist() == [pytest.approx([k3, k3], abs=1e-12)] * 2
    # the same TokenLoss as per_token, and the loss is exactly sum(weights * per-token loss)
    per_token = grpo_loss.per_token(logp, old, advantages, ref_logp=ref)
    assert torch.equal(token.loss, per_token.loss) and torch.equal(token.ratio, per_token.ratio)
    assert torch.equal(token.clipped, per_token.clipped) and torch.equal(token.kl, per_token.kl)
    assert torch.equal(loss, (weights * per_token.loss).sum())


@pytest.mark.parametrize(
    "clip_epsilon_high, upper, loss, grad, clipped",
    [
        # left out: the upper range is clip_epsilon, 0.1; rho = 1.15 > 1.1 is clipped: -1.1, no gradient
        (None, 0.1, -1.1, 0.0, 1.0),
        # given: 0.3; rho = 1.15 is inside [0.9, 1.3]: -rho * A = -1.15, gradient -1.15
        (0.3, 0.3, -1.15, -1.15, 0.0),
    ],
)
@pytest.mark.parametrize("section", ["loss", "grpo"])  # the loss's own options, and their older place
def test_from_recipe_takes_the_upper_clip_range_from_the_recipe(section, clip_epsilon_high, upper, loss, grad, clipped):
    data = {section: {"clip_epsilon": 0.1, "clip_epsilon_high": clip_epsilon_high}}
    grpo_loss = GRPOLoss.from_recipe(validate_recipe(data, "r.yaml", Path("."), "r").recipe)
    assert (grpo_loss.clip_low, grpo_loss.clip_high) == (0.1, upper)
    logp = torch.tensor([[math.log(1.15)]], dtype=torch.float64, requires_grad=True)
    out = grpo_loss.per_token(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    out.loss.sum().backward()
    assert (out.loss.item(), logp.grad.item(), out.clipped.item()) == (pytest.approx(loss, abs=1e-12),
                                                                        pytest.approx(grad, abs=1e-12), clipped)
