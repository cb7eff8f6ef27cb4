"""The policy-loss plugin kind: the default `grpo` loss is today's GRPOLoss, and the built-in
GSPO and CISPO losses against values and gradients worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from zenalign.plugins.losses import GRPOLoss, GRPOLossOptions
from zenalign.plugins import BuildContext, PolicyLoss, collect_registry
from zenalign_plugins.policy_losses import CISPOLoss, CISPOOptions, GSPOLoss, GSPOOptions

log = math.log


def context(kl_coef=0.01):
    """What a policy loss's factory gets besides its options: the KL weight and max_new_tokens."""
    return BuildContext(recipe=None, base_dir=Path.cwd(), kl_coef=kl_coef, max_new_tokens=64)


def leaf(*probs):
    return torch.tensor([[log(p) for p in probs]], dtype=torch.float64, requires_grad=True)


def old(*probs):
    return torch.tensor([[log(p) for p in probs]], dtype=torch.float64)


def value_and_grad(loss, logp, old_logp, advantage, mask=None):
    mask = torch.ones_like(old_logp) if mask is None else mask
    token = loss.per_token(logp, old_logp, torch.tensor([advantage], dtype=torch.float64), mask=mask)
    weights = loss.token_weights(mask).to(torch.float64)
    total = (token.loss * weights).sum()
    total.backward()
    return float(total.detach()), logp.grad[0].tolist(), token


def test_every_built_in_loss_is_a_policy_loss_plugin_and_grpo_is_the_default():
    registry = collect_registry()
    assert {"grpo", "gspo", "cispo"} <= set(registry.names("loss")) and registry.default("loss") == "grpo"
    built = registry.get("loss", "grpo").build(GRPOLossOptions(clip_epsilon=0.1, kl_estimator="k2"), context(0.05))
    assert isinstance(built, GRPOLoss) and isinstance(built, PolicyLoss)
    assert (built.clip_low, built.clip_high, built.kl_estimator, built.kl_coef, built.max_new_tokens) == (0.1, 0.1, "k2", 0.05, 64)


GSPO = GSPOOptions(epsilon=0.2, epsilon_high=0.2)  # a wide range, so the hand values sit inside and outside it


def test_gspo_inside_the_clip_range_is_the_sequence_ratio_times_the_advantage():
    # log ratios 0 and log 0.8: s = exp(log(0.8) / 2) = sqrt(0.8) = 0.894427, inside [0.8, 1.2]
    value, grad, token = value_and_grad(GSPOLoss(GSPO, context()), leaf(0.5, 0.4), old(0.5, 0.5), 1.0)
    s = math.sqrt(0.8)
    assert value == pytest.approx(-s)  # both tokens carry -s*A, averaged over the completion
    assert grad == pytest.approx([-s / 2, -s / 2])  # d(-s)/dlogp_t = -s * (1/2): the sequence objective's gradient
    assert token.ratio[0].tolist() == pytest.approx([s, s]) and token.clipped.sum() == 0


def test_gspo_outside_the_clip_range_drops_the_gradient_only_when_the_advantage_pushes_further():
    s = math.sqrt(0.5)  # log ratios log 0.5 and 0: s = 0.707107 < 0.8
    value, grad, token = value_and_grad(GSPOLoss(GSPO, context()), leaf(0.25, 0.5), old(0.5, 0.5), -1.0)
    assert value == pytest.approx(0.8)  # -min(-s, -0.8) = 0.8: the clipped term, constant
    assert grad == pytest.approx([0.0, 0.0]) and token.clipped[0].tolist() == [1.0, 1.0]
    value, grad, token = value_and_grad(GSPOLoss(GSPO, context()), leaf(0.25, 0.5), old(0.5, 0.5), 1.0)
    assert value == pytest.approx(-s) and grad == pytest.approx([-s / 2, -s / 2]) and token.clipped.sum() == 0


def test_gspo_averages_the_log_ratio_over_real_tokens_only():
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    value, grad, _ = value_and_grad(GSPOLoss(GSPO, context()), leaf(0.5, 0.4, 0.9), old(0.5, 0.5, 0.1), 1.0, mask)
    assert value == pytest.approx(-math.sqrt(0.8)) and grad[2] == 0.0  # the padding's ratio 9 is ignored


def test_gspo_defaults_are_the_papers_and_it_adds_the_kl_term():
    options = GSPOOptions()
    assert (options.epsilon, options.epsilon_high) == (3e-4, 4e-4)
    loss = GSPOLoss(options, context(kl_coef=0.1))
    logp, ref = leaf(0.5), old(0.25)
    token = loss.per_token(logp, logp.detach(), torch.tensor([0.0], dtype=torch.float64), ref_logp=ref)
    k3 = 0.5 - log(0.5) - 1  # pi_ref/pi - log(pi_ref/pi) - 1 with pi_ref/pi = 0.5
    assert float(token.loss[0, 0].detach()) == pytest.approx(0.1 * k3) and float(token.kl[0, 0].detach()) == pytest.approx(k3)


CISPO = CISPOOptions(epsilon_high=0.5)  # weights capped at 1.5, no lower bound


def test_cispo_clips_the_weight_and_keeps_every_tokens_gradient():
    # ratios 1 and 3: weights 1 and 1.5 (capped); loss_t = -w * A * log pi; grpo aggregation: mean over 2 tokens
    value, grad, token = value_and_grad(CISPOLoss(CISPO, context()), leaf(0.5, 0.9), old(0.5, 0.3), 2.0)
    assert value == pytest.approx((-1 * 2 * log(0.5) - 1.5 * 2 * log(0.9)) / 2)
    assert grad == pytest.approx([-1 * 2 / 2, -1.5 * 2 / 2])  # the capped token still moves, by its capped weight
    assert token.clipped[0].tolist() == [0.0, 1.0] and token.ratio[0].tolist() == pytest.approx([1.0, 3.0])
    value, grad, _ = value_and_grad(CISPOLoss(CISPO, context()), leaf(0.5, 0.9), old(0.5, 0.3), -1.0)
    assert value == pytest.approx((log(0.5) + 1.5 * log(0.9)) / 2) and grad == pytest.approx([0.5, 0.75])


def test_cispo_lower_bound_and_token_level_aggregation():
    loss = CISPOLoss(CISPOOptions(epsilon_low=0.2, epsilon_high=0.5, aggregation="dapo"), context())
    # ratio 0.4 < 0.8: weight 0.8; dapo divides by the batch's 1 token
    value, grad, token = value_and_grad(loss, leaf(0.2), old(0.5), 1.0)
    assert value == pytest.approx(-0.8 * log(0.2)) and grad == pytest.approx([-0.8]) and token.clipped[0, 0] == 1.0
    assert CISPOOptions().epsilon_low is None  # the paper leaves the weight unbounded below


def test_zero_advantage_gives_zero_loss_and_gradient_at_ratio_one():
    for loss in (GSPOLoss(GSPO, context()), CISPOLoss(CISPO, context()), GRPOLoss(0.2, 0.2)):
        assert loss.skips_zero_advantage_rows
        logp = leaf(0.5, 0.3)
        value, grad, _ = value_and_grad(loss, logp, logp.detach().clone(), 0.0)
        assert value == 0.0 and grad == [0.0, 0.0]


def test_the_guides_policy_loss_example_runs_from_a_recipe(tmp_path):
    """docs/writing-a-plugin.md's REINFORCE loss, as written, selected by a recipe and stepped."""
    from helpers import REPO
    from zenalign.recipe.loader import validate_recipe
    from zenalign.train.build import Builder, Inputs

    doc = (REPO / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")
    example = doc[doc.index("```python\nimport torch\nfrom zenalign import hookimpl\nfrom zenalign.plugins import AggregationOptions, PolicyLossType"):]
    (tmp_path / "reinforce.py").write_text(example[len("```python\n"):example.index("```", 10)])
    loaded = validate_recipe({"plugins": ["reinforce.py"], "loss": {"type": "reinforce", "aggregation": "dapo"}},
                             source="r.yaml", base_dir=tmp_path, name="r")
    loss = Builder(loaded, Inputs(), BuildContext(recipe=loaded.recipe, base_dir=tmp_path)).loss()
    assert (loss.aggregation, loss.max_new_tokens) == ("dapo", 64)  # its own option; sampling.max_new_tokens
    assert isinstance(loss, PolicyLoss)
    logp = leaf(0.5, 0.25)
    value, grad, _ = value_and_grad(loss, logp, logp.detach().clone(), 2.0)
    assert value == pytest.approx(-2 * (log(0.5) + log(0.25)) / 2) and grad == pytest.approx([-1.0, -1.0])


def test_at_ratio_one_the_three_losses_share_one_gradient():
    """With pi = pi_old (one optimizer step per generation) every built-in loss has the gradient
    -A * grad log pi per token, weighted by the per-completion mean: docs/algorithms.md says so."""
    grads = []
    for loss in (GRPOLoss(0.2, 0.2), GSPOLoss(GSPO, context()), CISPOLoss(CISPO, context())):
        logp = leaf(0.5, 0.3, 0.1)
        grads.append(value_and_grad(loss, logp, logp.detach().clone(), 1.5)[1])
    assert grads[0] == pytest.approx([-0.5, -0.5, -0.5]) and grads[1] == pytest.approx(grads[0])
    assert grads[2] == pytest.approx(grads[0])


def test_a_null_loss_section_is_a_one_line_error():
    from helpers import RECIPES, run_cli

    done = run_cli("validate", str(RECIPES / "quickstart.yaml"), "loss=null")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "loss: is null; give {type: ...} (installed: cispo, grpo, gspo" in done.stderr
