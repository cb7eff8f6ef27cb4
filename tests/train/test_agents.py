"""Training on multi-turn episodes through TRL's API: ``environment_factory=``, ``tools=``, reward
functions that see the whole episode, ``get_reward()`` as an objective, and the episode metrics."""

import json

import pytest

from helpers import GO, echo
from zenalign import GRPOTrainer
from zenalign.errors import PluginError, RecipeError
from zenalign.grpo.metrics import PhaseTimer


class EchoRoom:
    """A TRL-style environment: one instance per episode, its public methods the tools."""

    def reset(self, **row):
        self.said = []
        assert row["prompt"] == GO and row["want"] == ["a", "b"]  # every column of the row
        return None

    def echo(self, text: str) -> str:
        self.said.append(text)
        return text.upper()

    def get_reward(self) -> float:
        return float(self.said == ["a", "b"])


EchoRoom.echo.__doc__ = echo.__doc__  # the tool the scripted agent learnt to call


def test_a_trl_environment_factory_trains_on_episodes(tmp_path, scripted_agent_dir):
    seen = {}

    def said_done(completions, environments, want, **kwargs):
        seen.update(completions=completions, environments=environments)
        return [float(c[-1]["content"] == "done") for c in completions]

    out = tmp_path / "run"
    trainer = GRPOTrainer(model=str(scripted_agent_dir), reward_funcs=[said_done], environment_factory=EchoRoom,
                          max_tool_calling_iterations=2, num_generations=4, prompts_per_step=2, max_completion_length=200,
                          steps=2, kl_coef=0.0, learning_rate=1e-4, output_dir=str(out), progress_bar=False,
                          log_interval=1, log_samples=2, seed=0)
    result = trainer.train([{"prompt": GO, "want": ["a", "b"]}] * 4, eval_prompts=[{"prompt": GO, "want": ["a", "b"]}])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for m in lines:
        assert {"reward_mean/said_done", "reward_mean/EchoRoom"} <= set(m)
        assert 1 < m["turns/mean"] <= 3 and 0 <= m["tools/errors"] < m["tools/calls"]  # sampling: a call may go wrong
        assert m["episode/environment_tokens"] > 0 and m["episode/policy_tokens"] > 0 and m["time/environment"] >= 0
    # TRL's reward-function contract: the messages the policy and its tools wrote, and the episodes' environments
    first = seen["completions"][0]
    assert [m["role"] for m in first][:2] == ["assistant", "tool"] and first[1] == {"role": "tool", "name": "echo",
                                                                                       "content": "A"}
    assert all(isinstance(e, EchoRoom) for e in seen["environments"])
    # greedy evaluation runs the whole episode: the scripted agent's calls, then "done"
    assert result.initial_eval["eval/reward_mean/EchoRoom"] == 1.0
    assert result.initial_eval["eval/reward_mean/said_done"] == 1.0
    shown = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if '"eval"' in line]
    assert shown[0]["completion"] == "done" and shown[0]["messages"][-1] == {"role": "assistant", "content": "done"}


def test_tools_alone_are_an_environment_with_no_state(tmp_path, scripted_agent_dir):
    trainer = GRPOTrainer(model=str(scripted_agent_dir), reward_funcs=[lambda completions, **kw: [1.0] * len(completions)],
                          tools=[echo], num_generations=2, prompts_per_step=1, max_completion_length=200, steps=1,
                          output_dir=str(tmp_path / "run"), progress_bar=False, seed=0)
    trainer.setup([{"prompt": GO}], [])
    try:
        rollout = trainer.sample([{"prompt": GO}], None)
        assert rollout.episodes.turns == [3] and rollout.completions == ["done"]
        assert trainer.generator.environments.budgets.max_turns == 4  # the default (TRL: no limit)
    finally:
        trainer.cleanup()


def test_environment_mistakes_stop_before_the_first_step(tmp_path, scripted_agent_dir):
    class NoReset:
        def echo(self, text: str) -> str:
            return text

    common = dict(model=str(scripted_agent_dir), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                  output_dir=str(tmp_path / "run"), progress_bar=False)
    with pytest.raises(PluginError, match=r"environment 'NoReset': its episode object \(NoReset\) has no reset\(\)"):
        GRPOTrainer(environment_factory=NoReset, **common).train([{"prompt": GO}])
    with pytest.raises(RecipeError, match=r"environment_factory\['b'\] is a int; give a class"):
        GRPOTrainer(environment_factory={"a": EchoRoom, "b": 3}, **common).train([{"prompt": GO}])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_groups_refilled_by_dynamic_sampling_keep_each_episodes_own_prompt_and_mask(tmp_path, scripted_agent_dir):
    """Dynamic sampling drops groups whose episodes all scored the same and samples more; a batch
    picked over several rounds is rebuilt from token rows, each episode with its own prompt (rendered
    with the tools) and policy mask, as sampled."""
    rounds = iter([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # group 0 of round 0 all 0: dropped, refilled

    def coin(completions, **kwargs):
        return next(rounds)

    trainer = GRPOTrainer(model=str(scripted_agent_dir), reward_funcs=[coin], tools=[echo], num_generations=2,
                          prompts_per_step=2, max_completion_length=200, steps=1, output_dir=str(tmp_path / "run"),
                          progress_bar=False, seed=0, filters=[{"type": "dynamic_sampling", "max_extra_rounds": 3}])
    trainer.setup([{"prompt": GO}] * 4, [])
    try:
        batch = trainer.collect(1, PhaseTimer())
        assert batch.metrics["filter/rounds"] == 2 and batch.metrics["tools/calls"] > 0
        rollout = batch.rollout
        prompt = trainer.tokenizer(trainer.tokenizer.apply_chat_template(GO, tools=[echo], tokenize=False,
                                                                         add_generation_prompt=True),
                                   add_special_tokens=False)["input_ids"]
        for row, mask in zip(rollout.sequences, rollout.attention_mask):
            assert row[: rollout.prompt_length][mask[: rollout.prompt_length].bool()].tolist() == prompt
        assert rollout.policy_mask is not None and (rollout.policy_mask.sum(1) < rollout.completion_mask.sum(1)).any()
    finally:
        trainer.cleanup()


def test_a_get_reward_that_raises_stops_the_run_with_one_line_naming_it(tmp_path, scripted_agent_dir):
    class Fragile(EchoRoom):
        def get_reward(self) -> float:
            raise ZeroDivisionError("no episodes scored yet")

    Fragile.echo.__doc__ = echo.__doc__
    trainer = GRPOTrainer(model=str(scripted_agent_dir), environment_factory=Fragile, num_generations=2,
                          prompts_per_step=1, max_completion_length=200, steps=1, output_dir=str(tmp_path / "run"),
                          progress_bar=False, eval_interval=0, seed=0)
    with pytest.raises(Exception) as raised:
        trainer.train([{"prompt": GO, "want": ["a", "b"]}])
    message = str(raised.value)
    assert "environment 'Fragile': get_reward() raised ZeroDivisionError: no episodes scored yet" in message
    assert "\n" not in message


class Quiet:
    """Another environment, without a reward of its own; its reset sees no 'environment' field."""

    def reset(self, **row):
        assert "environment" not in row
        self.said = []

    def echo(self, text: str) -> str:
        return text.upper()


Quiet.echo.__doc__ = echo.__doc__


def test_a_dict_of_factories_picks_each_records_environment(tmp_path, scripted_agent_dir):
    """TRL's environment_factory as a dict: each record's 'environment' column picks the factory;
    get_reward is an objective per class that has one, and the other classes' episodes abstain."""
    trainer = GRPOTrainer(model=str(scripted_agent_dir), reward_funcs=[lambda completions, **kw: [1.0] * len(completions)],
                          environment_factory={"room": EchoRoom, "quiet": Quiet}, num_generations=2, prompts_per_step=2,
                          max_completion_length=200, steps=1, output_dir=str(tmp_path / "run"), progress_bar=False,
                          seed=0)
    records = [{"prompt": GO, "want": ["a", "b"], "environment": "room"}, {"prompt": GO, "environment": "quiet"}]
    trainer.setup(records, [])
    try:
        assert len(trainer.objectives.names) == 2 and trainer.objectives.names[-1] == "EchoRoom"
        batch = trainer.collect(1, PhaseTimer())
        states = batch.rollout.episodes.states
        kinds = [type(s).__name__ for s in states]
        by_record = {"room": "EchoRoom", "quiet": "Quiet"}
        assert kinds == [by_record[r["environment"]] for r in batch.records for _ in range(2)]
        rewards = batch.rewards.reshape(-1, batch.rewards.shape[-1])[:, -1]  # the EchoRoom objective
        for kind, value in zip(kinds, rewards.tolist()):
            assert (value == value) == (kind == "EchoRoom")  # NaN: abstained
        with pytest.raises(PluginError, match="a record's 'environment' is 'cellar'; the environments given are 'room', 'quiet'"):
            trainer.generator.environments.open({"prompt": GO, "environment": "cellar"})
    finally:
        trainer.cleanup()
