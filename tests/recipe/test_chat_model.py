"""The shipped chat model (recipes/models/reverse-chat-policy): its chat template renders messages,
tools, tool calls and tool results in the documented format, and recipes/quickstart-chat.yaml, on
TRL conversational prompts, learns like the quickstart."""

import json

import pytest
from transformers import AutoTokenizer

from helpers import RECIPES, run_cli

CHAT_POLICY = RECIPES / "models" / "reverse-chat-policy"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHAT_POLICY)


def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: The city's name.
    """
    return "sunny"


WEATHER_SCHEMA = ('{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", '
                  '"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": '
                  '"The city\'s name."}}, "required": ["city"]}, "return": {"type": "string"}}}')


def test_a_user_prompt_renders_with_the_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "reverse kqzt"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|user|>\nreverse kqzt\n<|assistant|>\n"
    assert (CHAT_POLICY / "chat_template.jinja").is_file()  # saved beside the weights, loaded with the tokenizer


def test_tools_tool_calls_and_tool_results_render(tokenizer):
    messages = [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": "weather in paris and rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "rome"}'}}]},
        {"role": "tool", "name": "get_weather", "content": "sunny"},
        {"role": "tool", "name": "get_weather", "content": "rain"},
        {"role": "assistant", "content": "paris sunny, rome rain"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[get_weather], tokenize=False)
    assert text == (
        "<|system|>\nanswer briefly\n# tools\n" + WEATHER_SCHEMA + "\n"
        "<|user|>\nweather in paris and rome?\n"
        '<|assistant|>\n<tool_call>{"name": "get_weather", "arguments": {"city": "paris"}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "rome"}}</tool_call></s>'
        "<|tool|>get_weather\nsunny\n<|tool|>get_weather\nrain\n"
        "<|assistant|>\nparis sunny, rome rain</s>"
    )
    # the end of a turn is the EOS id the policy generates, and nothing follows it
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.eos_token_id) == 2 and tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tools_without_a_system_message_open_a_system_block(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[json.loads(WEATHER_SCHEMA)],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\n# tools\n" + WEATHER_SCHEMA + "\n<|user|>\nhi\n<|assistant|>\n"


@pytest.mark.slow
def test_the_chat_quickstart_learns(tmp_path):
    """recipes/quickstart-chat.yaml shortened to 20 steps. Measured: held-out greedy accuracy 0.020 ->
    0.940, training reward 0.39 over the first 5 steps and 0.82 over the last 5 (the full 60 steps:
    0.020 -> 0.985). Asserted with margin: accuracy from below 0.1 to 0.6 or more, reward up by 0.2."""
    out = tmp_path / "run"
    done = run_cli("run", str(RECIPES / "quickstart-chat.yaml"), "run.steps=20", "run.eval_interval=0",
                   f"run.output_dir={out}", "-q")
    assert done.returncode == 0, done.stderr
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0]["eval/reward_mean/accuracy"], evals[-1]["eval/reward_mean/accuracy"]
    assert before < 0.1 and after >= 0.6, (before, after)
    rewards = [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(rewards[-5:]) / 5 >= sum(rewards[:5]) / 5 + 0.2, rewards
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == "<|user|>\nreverse daczsb\n<|assistant|>\n"  # through the chat template
