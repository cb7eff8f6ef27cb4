"""One step, phase by phase, on a tiny real model: the collector's StepBatch
(zenalign.train.collect), the advantages written into it (zenalign.train.advantage), the update
that takes it (zenalign.train.update), and the evaluator (zenalign.train.evaluation)."""

from __future__ import annotations

import json

import pytest
import torch

from zenalign import GRPOTrainer
from zenalign.data import PromptSampler, render_prompt
from zenalign.grpo.metrics import PhaseTimer
from zenalign.train.advantage import step_advantages
from zenalign.train.batch import StepBatch

WORDS = ["abc", "hello", "kq", "zenith", "moon", "tree"]


def length_reward(completions, **_):
    return [float(len(c)) for c in completions]


@pytest.fixture
def trainer(tmp_path, tiny_model_dir):
    prompts = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in WORDS]
    t = GRPOTrainer(model=str(tiny_model_dir), reward_model=length_reward, steps=1, group_size=3, prompts_per_step=2,
                    max_new_tokens=6, kl_coef=0.0, progress_bar=False, output_dir=str(tmp_path / "run"), seed=0,
                    eval_batch_size=2)
    t.setup(prompts, prompts[:3])
    yield t
    t.cleanup()


def test_the_collector_returns_one_step_batch_with_prompts_rendered_once(trainer):
    expected = PromptSampler(trainer.sampler.records, seed=0).next_batch(2)  # the run's seed
    batch = trainer.collect(1, PhaseTimer())
    assert trainer.sampler.state.index == 2 and batch.records == expected
    assert isinstance(batch, StepBatch) and batch.step == 1 and batch.group_size == 3
    assert len(batch) == 6 and len(batch.records) == 2 and batch.first == 0
    assert batch.prompts == [render_prompt(r, trainer.tokenizer) for r in batch.records]
    assert batch.prompts == [r["prompt"] for r in expected]  # no chat template: the text as it is
    # rewards: (P, G, K), each the completion's length, in the rollout's order
    assert batch.rewards.shape == (2, 3, 1)
    assert batch.rewards.reshape(-1).tolist() == [float(len(c)) for c in batch.rollout.completions]
    assert torch.equal(batch.local_rewards, batch.rewards.reshape(6, 1))
    assert torch.equal(batch.sampled_rewards, batch.rewards.reshape(6, 1))
    assert batch.keep.tolist() == [True, True] and batch.completion_mask is None
    # the policy produced every completion token: the loss mask is the completion mask
    assert torch.equal(batch.policy_mask, batch.rollout.completion_mask)
    assert torch.equal(batch.loss_mask, batch.rollout.completion_mask)
    assert batch.advantages is None and batch.ref_logp is None and batch.old_logp is None


def test_the_normalize_phase_writes_group_zscore_advantages_into_the_batch(trainer):
    """Rewards set by hand: group (1, 2, 3) -> z = (-1, 0, 1); group (5, 5, 5) -> 0, 0, 0 (no
    spread: the group gives no signal). This process's slice starts at ``first``."""
    batch = trainer.collect(1, PhaseTimer())
    batch.rewards = torch.tensor([[[1.0], [2.0], [3.0]], [[5.0], [5.0], [5.0]]])
    step_advantages(batch, trainer.normalizer, "group_zscore", trainer.updater, trainer.objectives, trainer.context,
                    PhaseTimer())
    assert batch.ref_logp is None  # kl_coef 0: no reference pass
    torch.testing.assert_close(batch.advantages, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    assert torch.equal(batch.advantages_global, batch.advantages)
    assert torch.equal(batch.per_completion_advantages, batch.advantages)
    # as the second of two processes would see it: its three completions are the second group
    half = StepBatch(1, 3, batch.records[1:], batch.prompts[1:], rows(batch.rollout, [3, 4, 5]), batch.rewards,
                     batch.sampled_rewards, batch.keep, first=3)
    half.rewards = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [6.0], [8.0]]])
    step_advantages(half, trainer.normalizer, "group_zscore", trainer.updater, trainer.objectives, trainer.context,
                    PhaseTimer())
    torch.testing.assert_close(half.advantages, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4, rtol=0)
    assert half.advantages_global.shape == (6,)


def rows(rollout, index):
    from dataclasses import replace

    pick = torch.tensor(index)
    return replace(rollout, sequences=rollout.sequences[pick], attention_mask=rollout.attention_mask[pick],
                   completion_mask=rollout.completion_mask[pick], truncated=rollout.truncated[pick],
                   completions=[rollout.completions[i] for i in index],
                   completion_ids=[rollout.completion_ids[i] for i in index])


def test_a_completion_mask_takes_completions_out_of_the_loss_mask_and_the_per_completion_mean(trainer):
    batch = trainer.collect(1, PhaseTimer())
    batch.completion_mask = torch.tensor([True, False, True, True, True, False])
    expected = batch.rollout.completion_mask * batch.completion_mask.long().unsqueeze(1)
    assert torch.equal(batch.loss_mask, expected)
    assert batch.loss_mask[1].sum() == 0 and batch.loss_mask[0].sum() == batch.rollout.completion_mask[0].sum()
    # a token-level advantage's per-completion value is its mean over the tokens that count
    tc = expected.shape[1]
    batch.advantages = torch.arange(6 * tc, dtype=torch.float32).view(6, tc)
    m = expected.float()
    mean = (batch.advantages * m).sum(1) / m.sum(1).clamp(min=1)
    torch.testing.assert_close(batch.per_completion_advantages, mean)
    assert float(batch.per_completion_advantages[1]) == 0.0


def test_the_update_takes_the_batch_and_its_loss_counts_only_the_loss_mask(trainer):
    """Masking completion 1 leaves its tokens out of the token count the update reports."""
    batch = trainer.collect(1, PhaseTimer())
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25])
    full = trainer.updater(batch)
    assert full["tokens"] == float(batch.rollout.completion_mask.sum())
    batch.completion_mask = torch.tensor([True, False, True, True, True, True])
    masked = trainer.updater(batch)
    assert masked["tokens"] == float(batch.rollout.completion_mask.sum() - batch.rollout.completion_mask[1].sum())
    assert masked["lr"] > 0 and masked["grad_norm"] > 0


def test_the_evaluator_scores_greedy_completions_of_every_held_out_prompt(trainer):
    metrics = trainer.evaluate()
    shown = [json.loads(line) for line in (trainer.run_dir.path / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in shown] == [f"reverse {w}:" for w in WORDS[:2]]  # the first batch's, at most 4
    written = [json.loads(line) for line in (trainer.run_dir.path / "eval.jsonl").read_text().splitlines()]
    assert written[-1]["eval/reward_mean"] == metrics["eval/reward_mean"]
    # greedy completions: the same again; their mean length is the mean reward
    again = trainer.sample([{"prompt": f"reverse {w}:"} for w in WORDS[:3]], None)
    assert metrics["eval/reward_mean"] == pytest.approx(sum(len(c) for c in again.completions) / 3)
