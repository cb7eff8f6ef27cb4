"""zenalign_plugins.lookup_task (a table lookup only the tool can answer), its shipped data files,
and the chat format of the policy that starts it (recipes/models/agent-policy): the tools line, and
the token-level contract of multi-turn episodes (a tool message and the next assistant header are a
pure suffix of what came before)."""

import inspect
import json
import re
import sys

import pytest
from transformers import AutoTokenizer
from transformers.utils import get_json_schema

from helpers import EOS, RECIPES
from zenalign_plugins.lookup_task import KEYS, LookupEnvironment, make_records, table

AGENT_POLICY = RECIPES / "models" / "agent-policy"


def test_the_table_is_a_function_of_the_seed():
    first = table(0)
    assert list(first) == [f"k{i:02d}" for i in range(100)] == KEYS
    # random.Random(0).randrange(1000) draws 864, 394, 776 first; random.Random(1) 137, 582, 867
    assert (first["k00"], first["k01"], first["k02"]) == ("864", "394", "776")
    assert (table(1)["k00"], table(1)["k01"], table(1)["k02"]) == ("137", "582", "867")
    assert table(0) == first and table(1) != first
    assert all(re.fullmatch(r"\d{3}", value) for value in first.values())
    assert any(value.startswith("0") for seed in range(3) for value in table(seed).values())  # zero-padded: "042"


def test_lookup_reads_the_table_of_the_reset_row_and_refuses_unknown_keys():
    env = LookupEnvironment()
    # TRL calls reset with every column of the row; the ones the environment does not use are ignored
    assert env.reset(prompt=[{"role": "user", "content": "value of k01?"}], seed=1, key="k01", answer="582",
                     environment="lookup", extra=3) is None
    assert env.lookup("k01") == "582" and env.lookup("k99") == table(1)["k99"]
    env.reset(seed=0)
    assert env.lookup("k01") == "394"
    for key in ("k100", "K01", "k1", ""):
        with pytest.raises(KeyError, match="k00 to k99"):
            env.lookup(key)


def test_the_tools_are_the_public_methods_and_lookup_has_a_schema():
    # TRL 1.16 takes every public function of the class but reset and get_reward as a tool
    public = [name for name, _ in inspect.getmembers(LookupEnvironment, inspect.isfunction) if not name.startswith("_")]
    assert public == ["lookup", "reset"]
    schema = get_json_schema(LookupEnvironment().lookup)
    assert schema["function"]["name"] == "lookup"
    assert schema["function"]["parameters"] == {
        "type": "object", "properties": {"key": {"type": "string", "description": "The key, from k00 to k99."}},
        "required": ["key"]}


def test_records_ask_for_one_key_and_carry_its_value():
    records = make_records(3, 0)
    # episodes 0, 1, 2; the first key is random.Random(0).choice(KEYS) = k49
    assert [r["seed"] for r in records] == [0, 1, 2]
    assert records[0] == {"prompt": [{"role": "user", "content": "value of k49?"}], "seed": 0, "key": "k49",
                          "answer": table(0)["k49"]}
    for record in make_records(50, 7):
        assert record["prompt"] == [{"role": "user", "content": f"value of {record['key']}?"}]
        assert record["answer"] == table(record["seed"])[record["key"]]
    assert make_records(50, 7) == make_records(50, 7)


def shipped(name: str) -> list[dict]:
    return [json.loads(line) for line in (RECIPES / "data" / name).read_text().splitlines()]


def test_the_shipped_data_hold_2000_training_and_200_disjoint_held_out_episodes():
    train, held_out = shipped("agent-lookup.jsonl"), shipped("agent-lookup-eval.jsonl")
    assert len(train) == 2000 and len(held_out) == 200
    train_seeds, held_out_seeds = {r["seed"] for r in train}, {r["seed"] for r in held_out}
    assert len(train_seeds) == 2000 and len(held_out_seeds) == 200 and not train_seeds & held_out_seeds
    assert all(r["answer"] == table(r["seed"])[r["key"]] for r in train + held_out)
    assert len({r["key"] for r in held_out}) > 50  # many keys asked, not a few


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(AGENT_POLICY)


USER = {"role": "user", "content": "value of k37?"}
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"key": "k37"}}}]}
TOOL = {"role": "tool", "name": "lookup", "content": "604"}
CALL_TEXT = '<tool_call>{"name": "lookup", "arguments": {"key": "k37"}}</tool_call>'


def clock() -> str:
    """The time of day."""
    return "noon"


def ids(tokenizer, messages, **options) -> list[int]:
    return tokenizer.apply_chat_template(messages, tools=[LookupEnvironment().lookup], **options)["input_ids"]


def test_the_agent_template_renders_tools_by_name(tokenizer):
    lookup = LookupEnvironment().lookup
    text = tokenizer.apply_chat_template([USER], tools=[lookup], tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\ntools: lookup\n<|user|>\nvalue of k37?\n<|assistant|>\n"
    system = [{"role": "system", "content": "be brief"}, USER]
    assert tokenizer.apply_chat_template(system, tools=[lookup, clock], tokenize=False) == \
        "<|system|>\nbe brief\ntools: lookup, clock\n<|user|>\nvalue of k37?\n"
    assert tokenizer.apply_chat_template([USER], tokenize=False) == "<|user|>\nvalue of k37?\n"  # no tools, no line
    assert (AGENT_POLICY / "chat_template.jinja").is_file()


@pytest.mark.parametrize("system", [[], [{"role": "system", "content": "be brief"}]])
def test_a_tool_message_and_the_next_header_are_a_pure_suffix(tokenizer, system):
    """What a multi-turn runner relies on: the next turn's ids are the previous ids plus the tool
    message's suffix, and the previous ids are the prompt plus exactly what the policy generated."""
    prompt = ids(tokenizer, system + [USER], add_generation_prompt=True)
    before = ids(tokenizer, system + [USER, CALL])
    after = ids(tokenizer, system + [USER, CALL, TOOL], add_generation_prompt=True)
    generated = [byte + 3 for byte in CALL_TEXT.encode()] + [EOS]  # a byte's id is the byte + 3
    assert before == prompt + generated and before[-1] == EOS and before.count(EOS) == 1
    assert after[:len(before)] == before
    assert tokenizer.decode(after[len(before):]) == "<|tool|>lookup\n604\n<|assistant|>\n"


def test_the_policy_copies_a_tool_result_greedily():
    """The shipped policy's second turn on 20 held-out episodes, given the right tool result: it
    answers with the result (the make_policies check measured the copy on all 200)."""
    sys.path.insert(0, str(RECIPES / "models"))
    try:
        import make_policies
    finally:
        sys.path.remove(str(RECIPES / "models"))
    from transformers import LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(AGENT_POLICY)
    model = LlamaForCausalLM.from_pretrained(AGENT_POLICY).eval()
    records = shipped("agent-lookup-eval.jsonl")[:20]
    prompts = [ids(tokenizer, r["prompt"] + [make_policies.agent_call(r["key"]), {**TOOL, "content": r["answer"]}],
                   add_generation_prompt=True) for r in records]
    answers = [tokenizer.decode(c, skip_special_tokens=True) for c in make_policies.agent_generate(model, prompts, 0.0)]
    assert sum(a == r["answer"] for a, r in zip(answers, records)) >= 18
