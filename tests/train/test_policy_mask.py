"""Tokens the policy did not sample (a tool's result inside an episode) get no gradient and count in
no statistic: the loss and its aggregations, the KL, entropy, clip and ratio sums, the logged
lengths, the length reward and overlong shaping, the vLLM importance correction, the critic's view,
and a batch rebuilt from token rows. Every count is worked out by hand on one hand-built rollout.

The rollout (prompt "ab", one group of 2, EOS = 1, PAD = 0), completion region of 9 columns:

    row 0: a b EOS | x y z | c d EOS     policy 1 1 1 0 0 0 1 1 1   6 policy tokens of 9
    row 1: a b c d EOS pad pad pad pad   policy 1 1 1 1 1 0 0 0 0   5 policy tokens of 5

so the batch holds 11 policy tokens; row 0's first turn ends with an EOS in mid-row.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import EOS, PAD, byte_tokenizer, captured_gradients
from zenalign.generation.rollout import (Rollout, completion_rows, encode_prompts, policy_mask_rows, rollout_from_rows,
                                         sampler_logp_rows)
from zenalign.grpo.metrics import PhaseTimer
from zenalign.grpo.scoring import make_batch
from zenalign.plugins import GRPOLoss, collect_registry, token_weights
from zenalign.train.batch import StepBatch
from zenalign.train.trainer import step_metrics

COMPLETION = [[110, 111, EOS, 120, 121, 122, 112, 113, EOS],
              [114, 115, 116, 117, EOS, PAD, PAD, PAD, PAD]]
REAL = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])               # completion_mask: every real token
POLICY = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0]])
INSERTED = REAL - POLICY                                          # row 0, columns 3-5
POLICY_TOKENS = 11                                                # 6 + 5
ADVANTAGES = torch.tensor([1.0, -0.5])
KL_COEF, MAX_NEW_TOKENS = 0.1, 10


def episode_rollout(policy_mask=POLICY) -> Rollout:
    ids, mask = encode_prompts(byte_tokenizer(), ["ab"])                                  # (1, 2), no padding
    completion = torch.tensor(COMPLETION)
    return Rollout(sequences=torch.cat([ids.repeat(2, 1), completion], dim=1),
                   attention_mask=torch.cat([mask.repeat(2, 1), REAL], dim=1), prompt_length=ids.shape[1],
                   completion_mask=REAL.clone(), truncated=torch.tensor([False, False]),
                   completions=["episode", "plain"], completion_ids=[COMPLETION[0][:8], COMPLETION[1][:4]],
                   policy_mask=None if policy_mask is None else policy_mask.clone())


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model_dir):
    from zenalign import GRPOTrainer

    t = GRPOTrainer(model=str(tiny_model_dir), reward_model=lambda completions: [0.0] * len(completions), steps=1,
                    group_size=2, prompts_per_step=1, max_new_tokens=MAX_NEW_TOKENS, kl_coef=KL_COEF,
                    progress_bar=False, output_dir=str(tmp_path_factory.mktemp("run")), seed=0)
    t.setup([{"prompt": "ab"}], [])
    yield t
    t.cleanup()


@pytest.fixture
def updater(trainer, monkeypatch):
    """The run's PolicyUpdate with the optimizer step recording the gradients (``updater.seen``) and
    leaving the weights as they are, so every update in a test starts from the same policy."""
    seen = captured_gradients(trainer, monkeypatch)
    u = trainer.updater
    monkeypatch.setattr(u, "num_iterations", 1)
    monkeypatch.setattr(u, "loss", GRPOLoss(0.2, 0.2, KL_COEF, "k3", "grpo", MAX_NEW_TOKENS))
    monkeypatch.setattr(u, "correction", ("off", 1.0))
    monkeypatch.setattr(u, "seen", seen, raising=False)
    return u


def k3(logp, ref_logp):
    x = ref_logp - logp
    return torch.exp(x) - x - 1.0


# ---------------------------------------------------------------------------------------------- the data model

def test_the_effective_policy_mask_and_the_batch_that_takes_it():
    plain = episode_rollout(policy_mask=None)
    assert plain.policy_token_mask is plain.completion_mask  # None: every completion token is the policy's
    assert plain.policy_lengths.tolist() == [9, 5] and plain.scored_lengths() == [8, 4]
    rollout = episode_rollout()
    assert torch.equal(rollout.policy_token_mask, POLICY)
    assert rollout.policy_lengths.tolist() == [6, 5] and rollout.scored_lengths() == [5, 4]  # EOS excluded
    batch = StepBatch.for_update(rollout, ADVANTAGES, completion_mask=torch.tensor([True, False]))
    assert torch.equal(batch.policy_mask, POLICY)
    assert batch.loss_mask.tolist() == [[1, 1, 1, 0, 0, 0, 1, 1, 1], [0] * 9]
    # the critic's view holds the policy's tokens of the completions that count, nothing inserted
    assert torch.equal(batch.token_batch().completion_mask, batch.loss_mask)
    # a token-level advantage's per-completion value averages over the policy's tokens only
    batch.advantages = torch.tensor([[2.0, 2.0, 2.0, 90.0, 90.0, 90.0, 5.0, 5.0, 5.0], [0.0] * 9])
    assert batch.per_completion_advantages.tolist() == [pytest.approx(21 / 6), 0.0]


def test_the_episode_runner_lays_out_its_rollouts_as_this_one():
    """zenalign.generation.episodes builds the same rows, masks and completion_ids from its token
    lists; the policy's token count a reward reads is completion_ids less the inserted tokens."""
    from zenalign.generation.environment import EpisodeLog
    from zenalign.generation.episodes import episode_rollout as runner_rollout

    prompt = episode_rollout().sequences[0, :2].tolist()
    region = [COMPLETION[0], COMPLETION[1][:5]]
    policy = [POLICY[0].tolist(), POLICY[1][:5].tolist()]
    log = EpisodeLog([[{"role": "assistant", "content": "episode"}], [{"role": "assistant", "content": "plain"}]], [])
    built = runner_rollout(byte_tokenizer(), [prompt, prompt], region, policy, [False, False], log, {EOS}, "cpu")
    mine = episode_rollout()
    for name in ("sequences", "attention_mask", "completion_mask", "policy_mask", "truncated"):
        assert torch.equal(getattr(built, name), getattr(mine, name)), name
    assert built.completion_ids == mine.completion_ids and built.completions == mine.completions
    assert built.scored_lengths() == [5, 4]  # 8 - 3 inserted, and 4
    # an episode cut at its last turn while it called a tool is truncated, its final EOS still excluded
    cut = runner_rollout(byte_tokenizer(), [prompt, prompt], region, policy, [True, False], log, {EOS}, "cpu")
    assert cut.scored_lengths() == [5, 4]


def test_a_batch_rebuilt_from_token_rows_keeps_the_policy_mask_and_the_whole_episode():
    """A refilling filter rebuilds its batch from the gathered rows: the episode's row is its whole
    completion region (its first turn's EOS does not end it), and the masks come back as they were."""
    rollout = episode_rollout()
    rollout.truncated[0] = True  # as an episode cut at its last turn while it called a tool (its row ends in an EOS)
    rollout.sampler_logp = torch.arange(18, dtype=torch.float32).view(2, 9).neg() * POLICY  # 0 off the policy's
    rows, policy = completion_rows(rollout), policy_mask_rows(rollout)
    assert [len(r) for r in rows] == [9, 5] and policy == [POLICY[0].tolist(), [1] * 5]
    rebuilt = rollout_from_rows(byte_tokenizer(), ["ab"], rows, 2, [EOS], sampler_rows=sampler_logp_rows(rollout),
                                policy_rows=policy, truncated=rollout.truncated)
    for name in ("sequences", "attention_mask", "completion_mask", "policy_mask", "sampler_logp", "truncated"):
        assert torch.equal(getattr(rebuilt, name), getattr(rollout, name)), name
    assert rebuilt.completion_ids == rollout.completion_ids
    # rows without a policy mask (a round sampled without episodes) are rebuilt as before: cut at the first EOS
    plain = rollout_from_rows(byte_tokenizer(), ["ab"], rows, 2, [EOS], policy_rows=[[], []])
    assert plain.policy_mask is None and plain.completion_mask.sum(dim=1).tolist() == [3, 5]


def test_the_collector_rebuilds_a_refilled_batch_with_its_policy_mask(trainer, monkeypatch):
    """Round 0's group dropped, round 1's (the episode) kept: the collector's assembled batch is
    rebuilt from round 1's gathered rows, and trains on its policy tokens only."""
    from dataclasses import replace

    collector = trainer.collect
    monkeypatch.setattr(collector, "max_rounds", 2)  # as with a refilling filter: the rows are gathered
    rewards = torch.zeros(2, 1, dtype=torch.float64)
    dropped = collector.filter_round(1, [{"prompt": "ab"}], ["ab"], episode_rollout(policy_mask=None), rewards)
    dropped.groups = replace(dropped.groups, keep=torch.tensor([False]))
    kept = collector.filter_round(1, [{"prompt": "ab"}], ["ab"], episode_rollout(), rewards)
    batch = collector.assemble(1, [dropped, kept], 1)
    assert batch.metrics["filter/rounds"] == 2.0 and batch.metrics["filter/groups_trained"] == 1.0
    assert torch.equal(batch.rollout.sequences, episode_rollout().sequences)
    assert torch.equal(batch.rollout.completion_mask, REAL) and torch.equal(batch.policy_mask, POLICY)
    assert float(batch.loss_mask.sum()) == POLICY_TOKENS
    assert batch.rollout.completions == ["episode", "plain"]  # as sampled, not decoded again from the rows


# ---------------------------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("aggregation, weight", [
    ("grpo", [[1 / 12] * 3 + [0.0] * 3 + [1 / 12] * 3, [1 / 10] * 5 + [0.0] * 4]),  # 1 / (policy tokens * 2 rows)
    ("dapo", [[1 / 11] * 3 + [0.0] * 3 + [1 / 11] * 3, [1 / 11] * 5 + [0.0] * 4]),  # 1 / 11 policy tokens
    ("dr_grpo", [[1 / 20] * 3 + [0.0] * 3 + [1 / 20] * 3, [1 / 20] * 5 + [0.0] * 4]),  # 1 / (2 * max_new_tokens)
])
def test_each_aggregation_counts_the_policy_tokens_only(aggregation, weight):
    mask = StepBatch.for_update(episode_rollout(), ADVANTAGES).loss_mask
    weights = token_weights(mask, aggregation, MAX_NEW_TOKENS)
    torch.testing.assert_close(weights, torch.tensor(weight), rtol=1e-7, atol=0)
    # d(loss)/d(logp) is exactly 0 at every inserted token, whatever its ratio, advantage or KL
    logp = torch.full((2, 9), -1.0, requires_grad=True)
    old = torch.full((2, 9), -1.0) - 0.3 * INSERTED                  # ratio e^0.3 only where inserted
    token_advantages = ADVANTAGES.unsqueeze(1) + 50.0 * INSERTED
    token = GRPOLoss(0.2, 0.2, KL_COEF).per_token(logp, old, token_advantages, ref_logp=torch.full((2, 9), -4.0))
    (token.loss * weights).sum().backward()
    assert torch.equal(logp.grad * INSERTED, torch.zeros(2, 9))
    # and on a policy token, weight * (-A + 0.1 * (1 - pi_ref / pi)) at ratio 1, pi_ref / pi = e^-3
    by_hand = torch.tensor(weight) * (-ADVANTAGES.unsqueeze(1) + KL_COEF * (1 - math.exp(-3.0)))
    torch.testing.assert_close(logp.grad, by_hand)


def test_gspo_averages_its_sequence_ratio_over_the_policy_tokens():
    from zenalign_plugins.policy_losses import GSPOLoss, GSPOOptions

    loss = GSPOLoss(GSPOOptions(), SimpleNamespace(kl_coef=0.0, max_new_tokens=MAX_NEW_TOKENS))
    log_ratio = torch.tensor([[0.006] * 3 + [5.0] * 3 + [0.0] * 3, [0.001] * 5 + [9.0] * 4])
    token = loss.per_token(log_ratio, torch.zeros(2, 9), ADVANTAGES, mask=POLICY)
    # s_0 = exp(3 * 0.006 / 6), s_1 = exp(5 * 0.001 / 5): the inserted tokens' 5.0 is not in the mean
    torch.testing.assert_close(token.ratio[:, 0], torch.tensor([math.exp(0.003), math.exp(0.001)]))


def test_the_update_trains_on_the_policy_tokens_only(trainer, updater):
    """The update's loss and gradient equal a loss written out here over the 11 policy tokens
    (grpo weights 1/12 and 1/10, the k3 KL at coefficient 0.1, ratio 1 at mu = 1); token advantages
    and reference log-probs changed at the inserted tokens change neither, to the bit."""
    rollout = episode_rollout()
    ref_logp = updater.reference_logprobs(rollout)
    result = updater(StepBatch.for_update(rollout, ADVANTAGES, ref_logp=ref_logp))
    assert result["tokens"] == POLICY_TOKENS

    logp = updater.forward(trainer.model, rollout, slice(0, 2))
    weights = torch.tensor([[1 / 12] * 3 + [0.0] * 3 + [1 / 12] * 3, [1 / 10] * 5 + [0.0] * 4])
    per_token = -torch.exp(logp - logp.detach()) * ADVANTAGES.unsqueeze(1) + KL_COEF * k3(logp, ref_logp)
    by_hand = (per_token * weights * POLICY).sum()
    trainer.model.zero_grad(set_to_none=True)
    by_hand.backward()
    want = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    assert result["loss"] == pytest.approx(float(by_hand.detach()), rel=1e-6)
    assert max(float(g.abs().max()) for g in want.values()) > 0
    for name, grad in want.items():
        torch.testing.assert_close(updater.seen[0][name], grad, rtol=1e-5, atol=1e-8)

    per_token_advantages = ADVANTAGES.unsqueeze(1).expand(2, 9).clone()
    garbage_adv = per_token_advantages + 1e3 * INSERTED
    garbage_ref = ref_logp + 7.0 * INSERTED
    clean = updater(StepBatch.for_update(rollout, per_token_advantages, ref_logp=ref_logp))
    dirty = updater(StepBatch.for_update(rollout, garbage_adv, ref_logp=garbage_ref))
    assert clean["loss"] == dirty["loss"] and clean["kl"] == dirty["kl"]
    for name, grad in updater.seen[1].items():
        assert torch.equal(updater.seen[2][name], grad), name


def test_a_rollout_without_a_policy_mask_trains_exactly_as_before(trainer, updater):
    """policy_mask None is every completion token: the same loss bits and gradients as the mask
    written out (completion_mask, the loss mask before policy masks existed)."""
    ref_logp = updater.reference_logprobs(episode_rollout())
    none = updater(StepBatch.for_update(episode_rollout(policy_mask=None), ADVANTAGES, ref_logp=ref_logp))
    explicit = updater(StepBatch.for_update(episode_rollout(policy_mask=REAL), ADVANTAGES, ref_logp=ref_logp))
    assert none == explicit and none["tokens"] == 14  # 9 + 5
    for name, grad in updater.seen[0].items():
        assert torch.equal(updater.seen[1][name], grad), name


def test_kl_entropy_clip_ratio_and_logged_counts_cover_the_policy_tokens(trainer, updater, monkeypatch):
    """mu = 2 with pi_old set by hand: ratio e^0.5 (clipped, advantage > 0) on row 0's first three
    tokens and on its three inserted ones, 1 elsewhere. Clipped: 3 of 11; ratio sum 3 e^0.5 + 8;
    KL, entropy and completion_len are means over the 11 policy tokens."""
    monkeypatch.setattr(updater, "num_iterations", 2)
    rollout = episode_rollout()
    ref_logp = updater.reference_logprobs(rollout)
    logp, entropy = updater.logprobs(trainer.model, rollout, entropy=True)
    shift = torch.tensor([[0.5] * 6 + [0.0] * 3, [0.0] * 9])
    result = updater(StepBatch.for_update(rollout, ADVANTAGES, ref_logp=ref_logp, old_logp=logp - shift))
    assert result["tokens"] == POLICY_TOKENS and result["entropy_tokens"] == POLICY_TOKENS
    assert result["clip"] == 3.0
    assert result["ratio"] == pytest.approx(3 * math.exp(0.5) + 8, rel=1e-5)
    assert result["kl"] == pytest.approx(float((k3(logp, ref_logp) * POLICY).sum()), rel=1e-5)
    assert result["entropy"] == pytest.approx(float((entropy * POLICY).sum()), rel=1e-5)

    metrics = step_metrics(trainer.state, trainer.dist, trainer.recipe, trainer.objectives, rollout,
                           torch.zeros(2, 1, dtype=torch.float64), result, PhaseTimer())
    assert metrics["completion_len"] == 11 / 2  # the policy's tokens per completion, not (9 + 5) / 2
    assert metrics["clip_frac"] == pytest.approx(3 / 11)
    assert metrics["ratio_mean"] == pytest.approx((3 * math.exp(0.5) + 8) / 11, rel=1e-5)
    assert metrics["kl"] == pytest.approx(result["kl"] / 11)
    assert metrics["entropy"] == pytest.approx(result["entropy"] / 11)


def test_the_importance_correction_weighs_the_policy_tokens_only(trainer, updater, monkeypatch):
    """Sampler log-probs cover the policy's tokens (0 elsewhere). token_truncate: 5 nats below pi_old
    caps every policy token at 2, so the loss doubles, over 11 tokens; sequence_mask: the inserted
    tokens' log-probs (absent from the sampler) do not enter rho, so no completion is masked."""
    rollout = episode_rollout()
    logp = updater.logprobs(trainer.model, rollout)
    weights = token_weights(POLICY, "dapo", MAX_NEW_TOKENS)

    def loss(sampler_logp, mode):
        rollout.sampler_logp = None if sampler_logp is None else sampler_logp * POLICY
        monkeypatch.setattr(updater, "correction", (mode, 2.0))
        with torch.no_grad():
            return float(updater.policy_loss(rollout, slice(0, 2), ADVANTAGES + 1.0, weights, None, None)[0])

    plain = loss(None, "off")
    assert plain != 0.0
    assert loss(logp - 5.0, "token_truncate") == pytest.approx(2.0 * plain, rel=1e-5)
    stats = updater.sampler_stats[-1]
    assert (stats.tokens, stats.units, stats.capped) == (11.0, 11.0, 11.0)
    assert stats.abs_diff == pytest.approx(5.0 * 11, rel=1e-5)
    assert loss(logp, "sequence_mask") == pytest.approx(plain, rel=1e-5)
    assert updater.sampler_stats[-1].capped == 0 and updater.sampler_stats[-1].units == 2


# ---------------------------------------------------------------------------------------------- lengths

def test_the_length_reward_and_overlong_shaping_read_the_policy_tokens(trainer):
    """The length reward (prefer shorter) scores -5 and -4 (policy tokens without the EOS), not -8 and
    -4. Overlong shaping with max_new_tokens 10 and cache_length 6 penalises tokens past 4: the
    policy's 6 and 5 tokens (with the EOS) give -2/6 and -1/6, where the completion's 9 would give -5/6."""
    from zenalign_plugins.length import LengthOptions, LengthReward

    rollout = episode_rollout()
    batch = make_batch(["ab"], [{"prompt": "ab"}], rollout.completions, rollout.completion_ids, 2, 1,
                       policy_lengths=rollout.scored_lengths())
    assert LengthReward(LengthOptions()).score(batch) == [-5.0, -4.0]
    assert LengthReward(LengthOptions()).score(make_batch(["ab"], [{"prompt": "ab"}], rollout.completions,
                                                          rollout.completion_ids, 2, 1)) == [-8.0, -4.0]

    registry = collect_registry()
    shaping = registry.get("filter", "overlong_shaping")
    context = SimpleNamespace(recipe=SimpleNamespace(sampling=SimpleNamespace(max_new_tokens=MAX_NEW_TOKENS)))
    collector = trainer.collect
    saved = collector.filters
    collector.filters = [("overlong_shaping", shaping.build(shaping.options(cache_length=6), context))]
    try:
        round_ = collector.filter_round(1, [{"prompt": "ab"}], ["ab"], rollout, torch.zeros(2, 1, dtype=torch.float64))
    finally:
        collector.filters = saved
    assert round_.groups.lengths.tolist() == [[6, 5]]
    assert round_.groups.rewards[0, :, 0].tolist() == pytest.approx([-2 / 6, -1 / 6])
