"""Advantages of every built-in normalizer, against values worked out by hand.

Rewards are (P, G, K); each test spells out the arithmetic in a comment.
"""

import math

import pytest
import torch

from zenalign.plugins.advantages import combine_objectives, nan_std, zero_variance
from zenalign.plugins import Objectives
from zenalign.plugins import collect_registry

NAN = float("nan")


def normalizer(name, **options):
    plugin_type = collect_registry().get("normalizer", name)
    return plugin_type.build(plugin_type.options(**options))


def single(*groups, weights=(1.0,)):
    """Rewards (P, G, 1) from lists of group rewards, with one objective."""
    return torch.tensor(groups, dtype=torch.float64).unsqueeze(-1), Objectives(("r",), torch.tensor(weights, dtype=torch.float64))


def approx(values, abs=1e-6):
    return pytest.approx(values, abs=abs)


# ---------------------------------------------------------------------------------------- z-score

def test_group_zscore_by_hand():
    rewards, objectives = single([1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0])
    adv = normalizer("group_zscore")(rewards, objectives)
    # group 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.577350; A = +-0.5 / (0.577350 + 1e-6)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert adv[0].tolist() == approx([a, -a, -a, a])
    # group 2: all equal -> exactly zero, not eps-small
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_zscore_population_std():
    rewards, objectives = single([1.0, 0.0, 0.0, 1.0])
    adv = normalizer("group_zscore", unbiased_std=False, eps=1e-8)(rewards, objectives)
    # population std of {1,0,0,1} is 0.5 -> A = +-1
    assert adv[0].tolist() == approx([1.0, -1.0, -1.0, 1.0])


def test_group_zscore_nan_left_out_of_statistics():
    rewards, objectives = single([1.0, NAN, 0.0, 0.0], [NAN, 1.0, NAN, NAN], [NAN, NAN, NAN, NAN])
    adv = normalizer("group_zscore", eps=1e-9)(rewards, objectives)
    # group 1 over {1, 0, 0}: mean 1/3, var = ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3, std 0.57735
    s = math.sqrt(1 / 3)
    assert adv[0].tolist() == approx([(2 / 3) / s, 0.0, -(1 / 3) / s, -(1 / 3) / s])
    # one valid reward, or none: no statistics -> zeros, never NaN
    assert adv[1].tolist() == [0.0] * 4
    assert adv[2].tolist() == [0.0] * 4


def test_zero_variance_is_exact_for_repeating_decimals():
    # mean of three 0.1s is 0.10000000000000002 in floating point; the group is still zero-variance
    rewards, objectives = single([0.1, 0.1, 0.1])
    assert normalizer("group_zscore")(rewards, objectives).tolist() == [[0.0, 0.0, 0.0]]
    assert zero_variance(torch.tensor([[0.1, 0.1, 0.1]], dtype=torch.float64)).item()


# ---------------------------------------------------------------------------------------- rank

def test_rank_with_ties():
    rewards, objectives = single([3.0, 1.0, 3.0, 2.0])
    adv = normalizer("rank")(rewards, objectives)
    # rank = 1 + #{r_j > r_i}: 3 -> 1, 1 -> 4, 3 -> 1 (tie shares rank 1), 2 -> 3
    # mean rank 9/4; A = (9/4 - rank) / (n - 1 = 3)
    assert adv[0].tolist() == approx([1.25 / 3, -1.75 / 3, 1.25 / 3, -0.75 / 3])
    assert adv[0].sum().item() == approx(0.0)


def test_rank_nan_and_constant_groups():
    rewards, objectives = single([3.0, NAN, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0])
    adv = normalizer("rank")(rewards, objectives)
    # valid {3, 1, 1}: ranks 1, 2, 2 (tie); mean 5/3; A = (5/3 - rank) / 2
    assert adv[0].tolist() == approx([1 / 3, 0.0, -1 / 6, -1 / 6])
    assert adv[1].tolist() == [0.0] * 4


# ---------------------------------------------------------------------------------------- RLOO, Dr. GRPO

def test_rloo_leave_one_out_baseline():
    rewards, objectives = single([1.0, 0.0, 0.0, 1.0], [1.0, NAN, 0.0, 0.5])
    adv = normalizer("rloo")(rewards, objectives)
    # group 1: 1 - (0+0+1)/3 = 2/3 ; 0 - (1+0+1)/3 = -2/3
    assert adv[0].tolist() == approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # group 2 over {1, 0, 0.5}: 1 - 0.25 = 0.75, 0 - 0.75 = -0.75, 0.5 - 0.5 = 0; NaN -> 0
    assert adv[1].tolist() == approx([0.75, 0.0, -0.75, 0.0])


def test_dr_grpo_mean_only():
    rewards, objectives = single([1.0, 0.0, 0.0, 1.0], [4.0, 2.0, NAN, 0.0])
    adv = normalizer("dr_grpo")(rewards, objectives)
    assert adv[0].tolist() == approx([0.5, -0.5, -0.5, 0.5])
    assert adv[1].tolist() == approx([2.0, 0.0, 0.0, -2.0])  # mean of {4, 2, 0} is 2


# ---------------------------------------------------------------------------------------- batch z-score

def test_batch_zscore_centers():
    rewards, objectives = single([1.0, 0.0], [1.0, 1.0])
    # batch {1, 0, 1, 1}: mean 0.75, unbiased var (3 * 0.0625 + 0.5625) / 3 = 0.25 -> std 0.5
    adv = normalizer("batch_zscore", eps=1e-9)(rewards, objectives)
    assert adv.tolist() == [approx([0.5, -1.5]), approx([0.5, 0.5])]
    # group centre, batch scale: (r - group mean) / 0.5
    adv = normalizer("batch_zscore", center="group", eps=1e-9)(rewards, objectives)
    assert adv.tolist() == [approx([1.0, -1.0]), approx([0.0, 0.0])]


def test_batch_zscore_constant_batch_is_zero():
    rewards, objectives = single([1.0, 1.0], [1.0, NAN])
    assert normalizer("batch_zscore")(rewards, objectives).tolist() == [[0.0, 0.0], [0.0, 0.0]]


# ---------------------------------------------------------------------------------------- objectives

def test_combine_objectives_weights_and_abstentions():
    rewards = torch.tensor([[[1.0, NAN], [0.0, 1.0], [1.0, 0.0], [NAN, NAN]]], dtype=torch.float64)
    combined = combine_objectives(rewards, torch.tensor([1.0, 0.5], dtype=torch.float64))
    # objective 2's group mean over {1, 0} is 0.5; the abstention is filled with it:
    # [1 + 0.5*0.5, 0 + 0.5*1, 1 + 0.5*0, all abstain -> NaN]
    assert combined[0, :3].tolist() == approx([1.25, 0.5, 1.0])
    assert math.isnan(combined[0, 3].item())


def test_nan_std_matches_torch_std():
    x = torch.tensor([[0.3, 1.7, -2.0, 4.0]], dtype=torch.float64)
    assert nan_std(x).item() == approx(x.std().item(), abs=1e-12)
    assert nan_std(x, unbiased=False).item() == approx(x.std(unbiased=False).item(), abs=1e-12)


# every normalizer of completion rewards (a learned critic's per-token advantages are tested in test_ppo.py)
GROUP_NORMALIZERS = [name for name, t in collect_registry().types["normalizer"].items()
                     if not hasattr(t.factory, "token_advantages")]


@pytest.mark.parametrize("name", sorted(GROUP_NORMALIZERS))
def test_no_normalizer_returns_nan(name):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 5, 2, generator=generator, dtype=torch.float64)
    rewards[torch.rand(6, 5, 2, generator=generator) < 0.3] = NAN
    rewards[0] = NAN  # a group that abstains entirely
    rewards[1, :, :] = 1.0  # a zero-variance group
    objectives = Objectives(("a", "b"), torch.tensor([1.0, 0.5], dtype=torch.float64))
    adv = normalizer(name)(rewards, objectives)
    assert adv.shape == (6, 5)
    assert not torch.isnan(adv).any()
    assert adv[0].abs().sum() == 0
    if name != "batch_zscore":  # batch centring gives a constant group a non-zero advantage, by design
        assert adv[1].tolist() == [0.0] * 5


@pytest.mark.parametrize("name", ["group_zscore", "batch_zscore", "normalize_then_sum", "mo_grpo"])
def test_huge_rewards_normalise_like_small_ones(name):
    """Issue 15, finding 2: rewards of 1e200 overflowed the variance (1e400) and every advantage
    became 0. Group statistics scale before squaring, so 1e200 * r normalises exactly like r."""
    small = torch.tensor([[[1.0], [-1.0], [0.0], [0.5]], [[2.0], [2.0], [1.0], [0.0]]], dtype=torch.float64)
    objectives = Objectives(("r",), torch.tensor([1.0], dtype=torch.float64))
    want = normalizer(name)(small, objectives)
    got = normalizer(name)(small * 1e200, objectives)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_nan_std_of_huge_values_is_finite():
    x = torch.tensor([[1e200, -1e200, 3e199]], dtype=torch.float64)
    want = 1e200 * torch.tensor([[1.0, -1.0, 0.3]], dtype=torch.float64).std().item()
    assert nan_std(x).item() == pytest.approx(want, rel=1e-12)
