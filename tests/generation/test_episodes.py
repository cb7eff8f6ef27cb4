"""Multi-turn episodes, token in and token out: the rows trained on are the tokens sampled, turn
after turn, with the tool messages the chat template renders between them and no other change;
each episode a function of its key; budgets that end an episode instead of the run."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import CHAT_TEMPLATE, EOS, GO, chat_tokenizer, echo, scripted_turns
from zenalign.errors import DataError, PluginError
from zenalign.generation.environment import Budgets, Environments
from zenalign.generation.episodes import TurnDecoder, run_episodes
from zenalign.generation.gumbel import completion_keys
from zenalign.generation.rollout import generate_groups
from zenalign.recipe.schema import SamplingSection

# The tiny chat template, except that an assistant turn followed by a later one is rendered as a
# placeholder: re-rendering a conversation rewrites its earlier turns, as Qwen3's template drops
# earlier <think> blocks.
LAST_ASSISTANT = ('{%- set ns = namespace(last=-1) -%}{%- for m in messages -%}{%- if m.role == "assistant" -%}'
                  '{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}\n')
REWRITING = LAST_ASSISTANT + CHAT_TEMPLATE.replace(
    '{%- if message.role == "assistant" -%}\n',
    '{%- if message.role == "assistant" and loop.index0 < ns.last -%}\n<|assistant|>\n(earlier){{ eos_token }}\n'
    '{%- elif message.role == "assistant" -%}\n', 1)


@pytest.fixture(scope="module")
def agent(scripted_agent_dir):
    return AutoModelForCausalLM.from_pretrained(scripted_agent_dir)


def tools(max_turns: int = 4, **budgets) -> Environments:
    return Environments("tools", None, [echo], Budgets(max_turns=max_turns, **budgets))


def episodes(model, keys=None, group_size=1, env=None, tokenizer=None, max_new_tokens=200, temperature=1.0):
    return run_episodes(model, tokenizer or chat_tokenizer(), [{"prompt": GO}], group_size, keys,
                        SamplingSection(max_new_tokens=max_new_tokens, temperature=temperature), env or tools(), [EOS])


def test_three_turns_train_on_exactly_the_sampled_tokens_even_where_the_template_rewrites_turns(agent, monkeypatch):
    sampled = []
    turn = TurnDecoder.turn

    def recording(self, *args):
        out = turn(self, *args)
        sampled.append(out[0])
        return out

    monkeypatch.setattr(TurnDecoder, "turn", recording)
    tokenizer = chat_tokenizer(REWRITING)
    rollout = episodes(agent, tokenizer=tokenizer)
    log = rollout.episodes
    assert [m.get("content") for m in log.messages[0]] == ["", "A", "", "B", "done"] and log.turns == [3]
    assert len(sampled) == 3 and [tokenizer.decode(t[:-1]) for t in sampled] == scripted_turns()
    # the suffixes the template gives the tool messages and the next assistant header
    suffixes = [tokenizer(f"<|tool|>echo\n{x}\n<|assistant|>\n", add_special_tokens=False)["input_ids"] for x in "AB"]
    expected = sampled[0] + suffixes[0] + sampled[1] + suffixes[1] + sampled[2]
    row = rollout.completion_tokens[0][rollout.completion_mask[0].bool()].tolist()
    assert row == expected  # byte for byte: what was sampled, and what was inserted between
    policy = [1] * len(sampled[0]) + [0] * len(suffixes[0]) + [1] * len(sampled[1]) + [0] * len(suffixes[1]) + \
             [1] * len(sampled[2])
    assert rollout.policy_mask[0, :len(row)].tolist() == policy
    # rendering the finished conversation again would have trained on other tokens than those sampled
    rendered = tokenizer.apply_chat_template(GO + log.messages[0], tools=[echo], tokenize=False)
    prompt = log.prompts[0]
    assert rendered.startswith(prompt) and "(earlier)" in rendered
    assert tokenizer(rendered[len(prompt):], add_special_tokens=False)["input_ids"] != row
    assert rollout.completion_ids[0] == row[:-1] and rollout.completions == ["done"] and not rollout.truncated[0]


def test_an_episode_is_a_function_of_its_key_alone(agent):
    keys = completion_keys(0, 0, 0, 4)
    together = episodes(agent, keys, group_size=4)
    assert len(set(together.episodes.turns)) > 1  # the episodes differ in turns, so in where each row waits
    for i in (1, 3):
        alone = episodes(agent, keys[i:i + 1])
        n = int(alone.completion_mask.sum())
        assert alone.completion_tokens[0, :n].tolist() == together.completion_tokens[i, :n].tolist()
        assert int(together.completion_mask[i].sum()) == n


def test_one_turn_without_tools_samples_what_the_one_turn_decoder_samples(agent):
    tokenizer, keys = chat_tokenizer(), completion_keys(0, 0, 0, 4)
    sampling = SamplingSection(max_new_tokens=12)
    plain = generate_groups(agent, tokenizer, [tokenizer.apply_chat_template(GO, tokenize=False, add_generation_prompt=True)],
                            sampling, [EOS], 4, keys=keys)
    ours = run_episodes(agent, tokenizer, [{"prompt": GO}], 4, keys, sampling, Environments("none", None, [], Budgets()),
                        [EOS])
    assert torch.equal(ours.sequences, plain.sequences) and ours.completions == plain.completions
    assert torch.equal(ours.policy_mask, plain.completion_mask)


def test_budgets_end_an_episode_marked_truncated(agent):
    two = episodes(agent, env=tools(max_turns=2))
    assert two.episodes.turns == [2] and bool(two.truncated[0])  # still calling a tool at its last turn
    assert "tool_calls" in two.episodes.messages[0][-1]
    short = episodes(agent, env=tools(max_episode_tokens=90))
    n = int(short.completion_mask[0].sum())
    assert bool(short.truncated[0]) and n < 90 and short.episodes.turns == [1]  # the tool message did not fit
    few = episodes(agent, max_new_tokens=70)  # 57 tokens in the first turn: 13 left for the second
    assert bool(few.truncated[0]) and int(few.policy_mask.sum()) == 70 and few.episodes.turns == [2]


def test_a_failing_tool_is_an_error_message_to_the_policy_and_is_counted(agent):
    def broken(text: str) -> str:
        raise RuntimeError("the echo is broken")

    broken.__name__, broken.__doc__ = echo.__name__, echo.__doc__  # the same tool to the model, so it calls it
    rollout = episodes(agent, env=Environments("broken", None, [broken], Budgets(max_turns=2)))
    log = rollout.episodes
    assert log.calls[0] >= 1 and log.errors == log.calls and log.timeouts == [0]
    assert log.messages[0][1] == {"role": "tool", "name": "echo",
                                  "content": '{"error": "RuntimeError: the echo is broken"}'}


class Source:
    def __init__(self, episode):
        self.episode = episode

    def new_episode(self):
        return self.episode()


def test_environment_mistakes_are_one_line_errors_naming_the_environment_and_the_method():
    class NoReset:
        pass

    class BadReset:
        def reset(self, **record):
            raise ValueError("no seed")

    def factory():
        raise OSError("disk gone")

    def undocumented(x):
        return x

    with pytest.raises(PluginError, match=r"environment 'inv': its episode object \(NoReset\) has no reset\(\)"):
        Environments("inv", Source(NoReset), [], Budgets())
    with pytest.raises(PluginError, match="environment 'inv': making an episode raised OSError: disk gone"):
        Environments("inv", Source(factory), [], Budgets())
    with pytest.raises(PluginError, match="environment 'inv': tool 'undocumented' cannot be described"):
        Environments("inv", None, [undocumented], Budgets())
    env = Environments("inv", Source(BadReset), [], Budgets())
    with pytest.raises(PluginError, match=r"environment 'inv': reset\(\) raised ValueError: no seed"):
        env.open({"prompt": GO})


def test_text_prompts_are_refused_with_what_an_environment_needs(agent):
    with pytest.raises(DataError, match="an environment needs chat prompts"):
        run_episodes(agent, chat_tokenizer(), [{"prompt": "go"}], 1, None, SamplingSection(), tools(), [EOS])
