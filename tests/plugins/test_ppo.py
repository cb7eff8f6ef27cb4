"""PPO with a learned critic (the ``gae`` normalizer): token rewards, GAE, whitening and the clipped
value loss by hand; the critic model; per-token advantages in the policy loss; runs, resume and
two processes through the real trainer."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch

from helpers import RECIPES, REPO, build_tiny_llama, byte_tokenizer, run_cli
from zenalign.errors import RecipeError
from zenalign.plugins.ppo import clipped_value_loss, gae, token_rewards, whiten
from zenalign.plugins.losses import GRPOLoss
from zenalign.models.critic import ValueModel


def test_token_rewards_put_the_reward_on_the_last_token_and_the_kl_everywhere():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.5, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    got = token_rewards(torch.tensor([1.0, -0.5, 3.0]), mask, kl, kl_coef=0.1)
    want = [[-0.01, -0.02, 1.0 - 0.03, 0.0], [-0.04, -0.5 - 0.05, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert got.tolist() == [pytest.approx(row) for row in want]
    assert token_rewards(torch.tensor([2.0]), torch.tensor([[1, 1]])).tolist() == [[0.0, 2.0]]  # no KL


def test_gae_by_hand():
    # row 0: V = (0.5, 0.2, 0.1), r = (0, 0, 1), gamma 0.9, lambda 0.8 (gamma * lambda = 0.72)
    #   delta_2 = 1 - 0.1 = 0.9                  A_2 = 0.9
    #   delta_1 = 0.9 * 0.1 - 0.2 = -0.11        A_1 = -0.11 + 0.72 * 0.9 = 0.538
    #   delta_0 = 0.9 * 0.2 - 0.5 = -0.32        A_0 = -0.32 + 0.72 * 0.538 = 0.06736
    # row 1: two tokens (the third is padding, its value ignored): V = (0.3, 0.4), r = (0, 2)
    #   delta_1 = 2 - 0.4 = 1.6                  A_1 = 1.6
    #   delta_0 = 0.9 * 0.4 - 0.3 = 0.06         A_0 = 0.06 + 0.72 * 1.6 = 1.212
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert advantages.tolist() == [pytest.approx([0.06736, 0.538, 0.9]), pytest.approx([1.212, 1.6, 0.0])]
    assert returns.tolist() == [pytest.approx([0.56736, 0.738, 1.0]), pytest.approx([1.512, 2.0, 0.0])]


def test_tokens_inserted_into_an_episode_are_no_time_step_of_gae():
    """Policy tokens at 0, 1 and 5, three inserted tokens (a tool's result) at 2-4, padding at 6: the
    reward goes on token 5, the last of the policy's; the KL only on the policy's tokens; and GAE runs
    over the policy's three tokens as if the inserted ones were not there: test_gae_by_hand's row 0."""
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 0]])
    kl = torch.tensor([[0.1, 0.2, 9.0, 9.0, 9.0, 0.3, 9.0]])
    got = token_rewards(torch.tensor([1.0]), mask, kl, kl_coef=0.1)
    assert got[0].tolist() == pytest.approx([-0.01, -0.02, 0.0, 0.0, 0.0, 1.0 - 0.03, 0.0])
    rewards = torch.tensor([[0.0, 0.0, 5.0, 5.0, 5.0, 1.0, 5.0]])  # what an inserted token holds is ignored
    values = torch.tensor([[0.5, 0.2, 7.0, 7.0, 7.0, 0.1, 7.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert advantages[0].tolist() == pytest.approx([0.06736, 0.538, 0.0, 0.0, 0.0, 0.9, 0.0])
    assert returns[0].tolist() == pytest.approx([0.56736, 0.738, 0.0, 0.0, 0.0, 1.0, 0.0])
    # whitened over the policy's tokens only: the inserted ones stay 0 and move neither the mean nor the spread
    assert torch.equal(whiten(advantages, mask)[0, 2:5], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(whiten(advantages, mask)[:, [0, 1, 5]], whiten(advantages[:, [0, 1, 5]], torch.ones(1, 3)))


def test_gae_with_gamma_and_lambda_one_is_the_return_minus_the_value():
    rewards = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    advantages, returns = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    to_go = [1.75, 1.25, 2.25, 0.25]  # sum of the rewards from t on
    assert advantages[0].tolist() == pytest.approx([g - v for g, v in zip(to_go, [0.1, 0.2, 0.3, 0.4])])
    assert returns[0].tolist() == pytest.approx(to_go)
    zero_lambda, _ = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=0.0)  # one-step TD errors
    assert zero_lambda[0].tolist() == pytest.approx([0.5 + 0.2 - 0.1, -1.0 + 0.3 - 0.2, 2.0 + 0.4 - 0.3, 0.25 - 0.4])


def test_whiten_over_the_masked_entries():
    got = whiten(torch.tensor([[1.0, 2.0], [3.0, 100.0]]), torch.tensor([[1, 1], [1, 0]]), eps=0.0)
    s = math.sqrt(2 / 3)  # mean 2, population variance 2/3
    assert got.tolist() == [pytest.approx([-1 / s, 0.0]), pytest.approx([1 / s, 0.0])]


def test_the_clipped_value_loss_by_hand():
    values = torch.tensor([1.5, 0.9, 1.5], requires_grad=True)
    old = torch.tensor([1.0, 1.0, 1.0])
    returns = torch.tensor([2.0, 2.0, 1.1])
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    # 1: (1.5 - 2)^2 = 0.25 against the clipped (1.2 - 2)^2 = 0.64: 0.32, no gradient
    # 2: inside the range: (0.9 - 2)^2 / 2 = 0.605, gradient 0.9 - 2 = -1.1
    # 3: (1.5 - 1.1)^2 = 0.16 against (1.2 - 1.1)^2 = 0.01: 0.08, gradient 0.4
    assert loss.tolist() == pytest.approx([0.32, 0.605, 0.08])
    assert clipped.tolist() == [1.0, 0.0, 0.0]
    loss.sum().backward()
    assert values.grad.tolist() == pytest.approx([0.0, -1.1, 0.4])
    plain, never = clipped_value_loss(values.detach(), old, returns, clip=None)
    assert plain.tolist() == pytest.approx([0.125, 0.605, 0.08]) and not never.any()


def test_the_grpo_loss_takes_one_advantage_per_token():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0]])           # ratios e^0.5 = 1.6487 (clipped at 1.2 for A > 0) and 1
    adv = torch.tensor([[2.0, -3.0]])
    token = GRPOLoss(clip_epsilon=0.2, clip_epsilon_high=0.2).per_token(logp, old, adv)
    assert token.loss[0].tolist() == pytest.approx([-1.2 * 2.0, 3.0])
    token.loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, 3.0])  # the clipped token has no gradient; -A * r = 3


@pytest.fixture(scope="module")
def critic_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    build_tiny_llama(seed=1).save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


def test_the_critic_is_the_policy_body_with_a_zero_head(critic_dir):
    critic = ValueModel.load(critic_dir, "model.path")
    policy = build_tiny_llama(seed=1)
    body = dict(critic.model.model.named_parameters())
    assert all(torch.equal(body[name], p) for name, p in policy.model.named_parameters())
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 1]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(critic.values(ids, mask, prompt_length=3), torch.zeros(2, 3))
    with torch.no_grad():
        critic.model.score.weight.normal_()
    got = critic.values(ids, mask, prompt_length=3)
    hidden = critic.model.model(input_ids=ids, attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    want = (hidden @ critic.model.score.weight.T)[..., 0]
    torch.testing.assert_close(got, want[:, 2:5])  # the states before completion tokens 3, 4 and 5
    critic.train()
    assert not critic.model.training  # no dropout in the critic


def make_trainer(tmp_path, model_dir, **options):
    from zenalign import GRPOTrainer

    settings = dict(steps=2, group_size=2, prompts_per_step=4, max_new_tokens=6, kl_coef=0.0, progress_bar=False,
                    output_dir=str(tmp_path / "run"), eval_interval=0, seed=0, normalizer=None)
    settings.update(options)
    return GRPOTrainer(model=str(model_dir), reward_model=lambda completions: [float(len(c)) for c in completions],
                       **settings)


PROMPTS = [{"prompt": f"reverse {w}:"} for w in ["abc", "hello", "xyz", "kite"]]


def test_with_a_zero_critic_and_no_discount_every_token_gets_the_reward(tmp_path, critic_dir):
    from zenalign.generation.gumbel import completion_keys
    from zenalign.plugins import TokenBatch

    trainer = make_trainer(tmp_path, critic_dir, normalizer={"type": "gae", "gamma": 1.0, "lam": 1.0, "kl_coef": 0.0,
                                                             "whiten": False})
    trainer.setup(PROMPTS, PROMPTS[:1])
    rollout = trainer.sample(PROMPTS, completion_keys(seed=0, step=1, first_completion=0, count=8))
    rewards = torch.arange(8, dtype=torch.float64).unsqueeze(1)  # (N, K = 1)
    tokens = TokenBatch(rollout.sequences, rollout.attention_mask, rollout.prompt_length, rollout.completion_mask,
                        torch.zeros(rollout.completion_mask.shape), None)
    advantages = trainer.normalizer.token_advantages(tokens, rewards, trainer.objectives, trainer.context)
    trainer.cleanup()
    want = rewards * rollout.completion_mask  # A_t = R - V_t with V = 0, on every real token
    torch.testing.assert_close(advantages, want.float())


def test_the_critic_learns_the_returns_of_a_batch(tmp_path, critic_dir):
    from zenalign.generation.gumbel import completion_keys
    from zenalign.plugins import TokenBatch

    trainer = make_trainer(tmp_path, critic_dir, normalizer={"type": "gae", "kl_coef": 0.0, "learning_rate": 3e-3,
                                                             "value_clip": None, "lam": 1.0})
    trainer.setup(PROMPTS, PROMPTS[:1])
    rollout = trainer.sample(PROMPTS, completion_keys(seed=0, step=1, first_completion=0, count=8))
    rewards = torch.tensor([[1.0], [0.0]] * 4)
    tokens = TokenBatch(rollout.sequences, rollout.attention_mask, rollout.prompt_length, rollout.completion_mask,
                        torch.zeros(rollout.completion_mask.shape), None)
    losses = []
    for _ in range(15):
        trainer.normalizer.token_advantages(tokens, rewards, trainer.objectives, trainer.context)
        trainer.normalizer.train_critic(tokens, trainer.context)
        losses.append(trainer.normalizer.metrics()["critic/value_loss"])
    trainer.cleanup()
    # the first loss is that of V = 0 against returns of 1 on every token of the rewarded rows (gamma = lambda = 1)
    # and 0 elsewhere: 0.5 * 1^2 on the rewarded rows' tokens, a mean over all tokens
    lengths = rollout.completion_mask.sum(dim=1).double()
    assert losses[0] == pytest.approx(0.5 * float(lengths[0::2].sum() / lengths.sum()))
    # rows 2i and 2i+1 share a prompt, so the value before the first token cannot tell them apart: the loss
    # cannot reach 0, but it must fall well below where it started
    assert losses[-1] < 0.3 * losses[0] and losses[-1] < losses[5] < losses[0]


def test_gae_refuses_a_second_kl_term_and_zero3(tmp_path, critic_dir):
    with pytest.raises(RecipeError, match=r"set grpo.kl_coef to 0 \(it is 0.01\)"):
        make_trainer(tmp_path, critic_dir, kl_coef=0.01, normalizer={"type": "gae"}).setup(PROMPTS, PROMPTS[:1])
    from zenalign.plugins import BuildContext, collect_registry

    ppo = make_trainer(tmp_path, critic_dir, normalizer={"type": "gae"}, backend="deepspeed", zero_stage=3)
    gae_type = collect_registry().get("normalizer", "gae")
    with pytest.raises(RecipeError, match="engine.zero_stage 0-2"):  # the factory refuses before loading anything
        gae_type.build(ppo.recipe.normalizer, BuildContext(recipe=ppo.recipe, base_dir=tmp_path))


def test_a_loss_of_one_ratio_per_completion_is_refused_with_per_token_advantages(tmp_path, critic_dir):
    with pytest.raises(RecipeError, match=r"loss \(gspo\): takes one advantage per completion, but normalizer 'gae'"):
        make_trainer(tmp_path, critic_dir, normalizer={"type": "gae"}, loss={"type": "gspo"}).setup(PROMPTS, PROMPTS[:1])


def test_a_completion_that_abstains_gets_no_advantage_and_does_not_train_the_critic(tmp_path, critic_dir):
    from zenalign.generation.gumbel import completion_keys
    from zenalign.plugins import TokenBatch

    trainer = make_trainer(tmp_path, critic_dir, normalizer={"type": "gae", "kl_coef": 0.0, "whiten": False,
                                                             "lam": 1.0})
    trainer.setup(PROMPTS, PROMPTS[:1])
    rollout = trainer.sample(PROMPTS, completion_keys(seed=0, step=1, first_completion=0, count=8))
    rewards = torch.tensor([[1.0], [float("nan")], [0.0], [2.0], [float("nan")], [1.0], [0.0], [3.0]])
    tokens = TokenBatch(rollout.sequences, rollout.attention_mask, rollout.prompt_length, rollout.completion_mask,
                        torch.zeros(rollout.completion_mask.shape), None)
    advantages = trainer.normalizer.token_advantages(tokens, rewards, trainer.objectives, trainer.context)
    trainer.normalizer.train_critic(tokens, trainer.context)
    trainer.cleanup()
    scored = ~rewards[:, 0].isnan()
    assert advantages[~scored].abs().sum() == 0
    torch.testing.assert_close(advantages[scored], (rewards[scored] * rollout.completion_mask[scored]).float())
    lengths = rollout.completion_mask.sum(dim=1).double()
    # the first value loss is 0.5 * R^2 per token of the scored rows, a mean over their tokens only
    want = 0.5 * float((rewards[scored, 0].double() ** 2 * lengths[scored]).sum() / lengths[scored].sum())
    assert trainer.normalizer.metrics()["critic/value_loss"] == pytest.approx(want)


def test_group_size_one_needs_a_normalizer_without_groups(tmp_path, critic_dir):
    with pytest.raises(RecipeError, match=r"sampling.group_size: must be >= 2 \(got 1\); normalizer 'group_zscore'.*"
                                          r"installed: gae"):
        make_trainer(tmp_path, critic_dir, group_size=1)
    make_trainer(tmp_path, critic_dir, group_size=1, normalizer={"type": "gae"})  # accepted


QUICKSTART = str(RECIPES / "quickstart.yaml")
PPO = ["run.steps=4", "run.eval_interval=0", "data.eval_size=16", "run.checkpoint_interval=2", "-q", "grpo.kl_coef=0",
       "normalizer={type: gae, learning_rate: 1.0e-3}", "grpo.loss_aggregation=dapo", "grpo.num_iterations=2"]


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "completions_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [1, 2])
def test_a_ppo_run_resumes_exactly_with_its_critic(tmp_path, group_size):
    options = [*PPO, f"sampling.group_size={group_size}", f"grpo.prompts_per_step={16 // group_size}"]
    whole = tmp_path / "whole"
    done = run_cli("run", QUICKSTART, *options, f"run.output_dir={whole}")
    assert done.returncode == 0, done.stderr
    lines = metrics(whole)
    assert all({"critic/value_loss", "critic/explained_variance", "critic/kl_in_reward"} <= set(line) for line in lines)
    assert all(line["kl"] > 0 for line in lines[1:])  # the reference is loaded for the KL in the reward
    assert (whole / "checkpoints" / "step-00000002" / "plugins" / "normalizer" / "critic" / "model.safetensors").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    done = run_cli("run", QUICKSTART, *options, f"run.output_dir={resumed}", "--resume",
                   str(resumed / "checkpoints" / "step-00000002"))
    assert done.returncode == 0, done.stderr
    assert metrics(resumed) == lines


@pytest.mark.slow
def test_two_processes_train_the_same_critic_as_one(tmp_path):
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    options = [*PPO, "run.checkpoint_interval=0", "sampling.group_size=2", "grpo.prompts_per_step=8"]
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_cli("run", QUICKSTART, *options, f"run.output_dir={one}")
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                           "-m", "zenalign", "run", QUICKSTART, *options, f"run.output_dir={two}"], cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(metrics(one)) == len(metrics(two)) == 4
    for a, b in zip(metrics(one), metrics(two)):
        assert a["reward_mean"] == b["reward_mean"]
        for key in ("loss", "kl", "critic/value_loss", "critic/value_mean", "critic/explained_variance"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), (a["step"], key)
