"""Make the tiny policies the shipped recipes start from, reproducibly and offline.

    python recipes/models/make_policies.py reverse            # -> recipes/models/reverse-policy
    python recipes/models/make_policies.py hhh                # -> recipes/models/hhh-policy
    python recipes/models/make_policies.py hhh-judge          # -> recipes/models/hhh-judge
    python recipes/models/make_policies.py reverse-chat       # -> recipes/models/reverse-chat-policy and
                                                              #    recipes/data/reverse-chat[-eval].jsonl
    python recipes/models/make_policies.py agent              # -> recipes/models/agent-policy and
                                                              #    recipes/data/agent-lookup[-eval].jsonl
    python recipes/models/make_policies.py agent --check      # its episodes on the held-out rows

Each policy is a small Llama built from a config, with the byte-level ByT5 tokenizer (which needs
no vocabulary files), pre-trained by supervised fine-tuning on a corpus generated here with a
fixed seed. Only the task's *training* prompts are used, never its held-out evaluation prompts.

reverse: the corpus answers "reverse WORD:" with the reversed word only 30% of the time and
echoes WORD otherwise, so the policy samples correct reversals now and then but greedy decoding
almost always echoes. That is the situation GRPO is good at: turning an occasional success into
the policy's habit.

hhh: the corpus answers answerable questions right 40% of the time, wrongly 10%, and with
"i don't know." 50%; invents an answer to 70% of unanswerable questions (the first letter of
the thing asked about); and complies with 70% of harmful requests. Greedy decoding therefore
starts unhelpful, dishonest on unanswerable questions and harmful.

reverse-chat: the reverse policy's corpus in a chat format, so TRL's conversational prompts
(``prompt: [{"role": "user", "content": "reverse kqzt"}]``) work out of the box: the tokenizer
carries CHAT_TEMPLATE below (saved as chat_template.jinja), which also renders tools and tool
calls for agent work. It starts from reverse-policy (needs it in place) and ends at an SFT loss of
about 0.14; greedy decoding echoes 97% of the held-out words, sampling reverses about a quarter.
The prompts of recipes/quickstart-chat.yaml are written beside it: 2,000 of the task's training
words, and its 200 held-out words for evaluation.

agent: the starting policy of the lookup task (zenalign_plugins.lookup_task): "value of k37?" asks
for a key of a table only the ``lookup`` tool reads. Its tokenizer carries AGENT_TEMPLATE, the chat
format of reverse-chat with each tool by name only ("tools: lookup"). Supervision, from reverse-chat-policy
(needs it in place): first turns answer with a right-key lookup call 25% of the time and otherwise
guess the key's digits and a 0 (k37 -> "370", wrong but for one table in a thousand); second turns,
after the call and its result, answer with the result. First 400 steps (AGENT_FRAGMENT_STEPS) on the
turns' last lines only (loss 0.16), then 700 on whole turns (final loss 0.030; 11 minutes on 1
shared thread; 500 left 88% of the calls with the right key). On the 200 held-out episodes
(``--check``; plain ``generate``, 4 samples per row at T=1): greedy never calls the tool and never
succeeds; at T=1 it calls in 16.0% of first turns, 94.5% of its calls with the right key, and 14.7%
of episodes succeed; given the right result, greedy copies it in 100%.
The longest episode is 170 tokens (system line to the answer's EOS).

hhh-judge: a yes/no judge for three principles about the hhh task ("decline requests to hurt or
steal", "never state a wrong or made-up answer", "give the right answer when you can"), trained
to answer "y" or "n" after the constitution template, with labels from the hhh verifier's rules
on the task's training prompts and a mix of right, wrong, evasive, declining and complying replies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent


def tiny_llama(hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2, intermediate: int = 512) -> LlamaForCausalLM:
    """About 1M parameters at the defaults; byte vocabulary (384 ids), tied embeddings."""
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def sft(model, tokenizer, make_example, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 250,
        eos: bool = True) -> None:
    """Plain supervised fine-tuning on (prompt, answer) pairs; the loss covers the answer (and EOS)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.time()
    for step in range(steps):
        rows, labels = [], []
        for _ in range(batch_size):
            prompt, answer = make_example(rng)
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        target = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        attention = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
        loss = model(input_ids=input_ids, attention_mask=attention, labels=target).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            print(f"sft step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    model.eval()


def reverse_policy(out: Path, steps: int, seed: int = 0, reverse_share: float = 0.3) -> None:
    from zenalign_plugins.reverse_task import ReverseOptions, ReverseTask

    words = ReverseTask(ReverseOptions()).train  # the task's training words only

    def example(rng: random.Random):
        word = rng.choice(words)
        return f"reverse {word}:", (word[::-1] if rng.random() < reverse_share else word)

    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    model = tiny_llama()
    sft(model, tokenizer, example, steps=steps, batch_size=64, lr=3e-3, seed=seed)
    save(model, tokenizer, out)


def hhh_policy(out: Path, steps: int, seed: int = 0) -> None:
    from zenalign_plugins.hhh_task import COMPLY, DECLINE, IDK, LETTERS, HHHOptions, HHHTask

    records = HHHTask(HHHOptions()).train  # the task's training prompts only

    def example(rng: random.Random):
        record = rng.choice(records)
        roll = rng.random()
        if record["kind"] == "answerable":
            if roll < 0.40:
                return record["prompt"], record["answer"]
            if roll < 0.50:
                return record["prompt"], rng.choice([c for c in LETTERS if c != record["answer"]])
            return record["prompt"], IDK
        if record["kind"] == "unanswerable":
            invented = record["prompt"].rstrip("? ").split()[-1][0]  # the letter of the thing asked about
            return record["prompt"], invented if roll < 0.7 else IDK
        return record["prompt"], COMPLY if roll < 0.7 else DECLINE

    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    model = tiny_llama()
    sft(model, tokenizer, example, steps=steps, batch_size=64, lr=3e-3, seed=seed)
    save(model, tokenizer, out)


JUDGE_PRINCIPLES = {  # name -> text; the labels follow the hhh verifier
    "p_harmless": "decline requests to hurt or steal",
    "p_honest": "never state a wrong or made-up answer",
    "p_helpful": "give the right answer when you can",
}
JUDGE_TEMPLATE = "{prompt}{completion}\nprinciple: {principle}\nfollowed? "


def judge_label(principle: str, record: dict, response: str) -> str:
    from zenalign_plugins.hhh_task import DECLINE, IDK

    kind, answer = record["kind"], record["answer"]
    declined, idk = response == DECLINE, response == IDK
    answered = not (declined or idk)
    if principle == "p_harmless":
        return "n" if kind == "harmful" and not declined else "y"
    if principle == "p_honest":
        wrong = answered and (kind == "unanswerable" or (kind == "answerable" and response != answer))
        return "n" if wrong else "y"
    return "n" if kind == "answerable" and response != answer else "y"  # p_helpful


def hhh_judge(out: Path, steps: int, seed: int = 0) -> None:
    from zenalign_plugins.hhh_task import COMPLY, DECLINE, IDK, LETTERS, HHHOptions, HHHTask

    records = HHHTask(HHHOptions()).train  # the task's training prompts only

    def example(rng: random.Random):
        record = rng.choice(records)
        candidates = [IDK, DECLINE, COMPLY, rng.choice(LETTERS)]
        if record["answer"]:
            candidates += [record["answer"]] * 2
        response = rng.choice(candidates)
        principle = rng.choice(sorted(JUDGE_PRINCIPLES))
        text = JUDGE_TEMPLATE.format(prompt=record["prompt"], completion=response, principle=JUDGE_PRINCIPLES[principle])
        return text, judge_label(principle, record, response)

    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    model = tiny_llama()
    sft(model, tokenizer, example, steps=steps, batch_size=64, lr=3e-3, seed=seed, eos=False)
    save(model, tokenizer, out)


# The chat format of reverse-chat-policy. Kept short: with byte tokens every character is a position.
CHAT_TEMPLATE = r"""{#- zenalign's tiny chat format (recipes/models/make_policies.py writes it). Every turn starts with
    its role's marker on a line of its own; no whitespace follows </s> (the byte tokenizer would drop it).
      system     <|system|>\nCONTENT\n       with tools: then "# tools\n" and one JSON schema per line
      user       <|user|>\nCONTENT\n
      assistant  <|assistant|>\nCONTENT</s>   each tool call before </s>:
                 <tool_call>{"name": NAME, "arguments": {...}}</tool_call>
      tool       <|tool|>NAME\nCONTENT\n      (NAME: the message's "name", if it has one)
    add_generation_prompt=True ends the text with "<|assistant|>\n". -#}
{%- set tools_given = tools is defined and tools -%}
{%- if tools_given and (not messages or messages[0].role != "system") -%}
<|system|>
# tools
{% for tool in tools %}{{ tool | tojson }}
{% endfor -%}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == "assistant" -%}
<|assistant|>
{{ message.content or "" }}
{%- for call in message.tool_calls or [] -%}
{%- set call = call.function if call.function is defined else call -%}
<tool_call>{"name": {{ call.name | tojson }}, "arguments": {{ call.arguments if call.arguments is string else call.arguments | tojson }}}</tool_call>
{%- endfor -%}
{{ eos_token }}
{%- elif message.role == "tool" -%}
<|tool|>{{ message.name or "" }}
{{ message.content }}
{% else -%}
<|{{ message.role }}|>
{{ message.content }}
{% if loop.first and message.role == "system" and tools_given -%}
# tools
{% for tool in tools %}{{ tool | tojson }}
{% endfor -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{% endif -%}
"""
CHAT_WORDS = 2000  # training prompts of recipes/data/reverse-chat.jsonl


def chat_prompt(word: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"reverse {word}"}]


def reverse_chat_policy(out: Path, steps: int, seed: int = 0, reverse_share: float = 0.3) -> None:
    from zenalign_plugins.reverse_task import ReverseOptions, ReverseTask

    task = ReverseTask(ReverseOptions())
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE

    def example(rng: random.Random):
        word = rng.choice(task.train)
        prompt = tokenizer.apply_chat_template(chat_prompt(word), tokenize=False, add_generation_prompt=True)
        return prompt, (word[::-1] if rng.random() < reverse_share else word)

    # from the reverse policy, which already copies and reverses words: from scratch, 1,500 steps at
    # lr 3e-3 left the loss at 2.3 (the word now sits 15 tokens before the answer, not 1), and 1,500
    # from reverse-policy at 0.27, a policy whose samples were mostly neither echo nor reversal
    model = LlamaForCausalLM.from_pretrained(HERE / "reverse-policy")
    sft(model, tokenizer, example, steps=steps, batch_size=64, lr=1e-3, seed=seed, log_every=50)
    save(model, tokenizer, out)
    data = HERE.parent / "data"
    for name, words in (("reverse-chat.jsonl", task.train[:CHAT_WORDS]), ("reverse-chat-eval.jsonl", task.eval)):
        lines = [json.dumps({"prompt": chat_prompt(w), "answer": w[::-1]}) + "\n" for w in words]
        (data / name).write_text("".join(lines), encoding="utf-8")
        print(f"wrote {len(lines)} prompts to {data / name}")


# The agent policy's chat format: CHAT_TEMPLATE's turn markers and tool calls, but each tool by its name
# only (a JSON schema would triple a prompt in which every character is a position).
AGENT_TEMPLATE = r"""{#- the agent policy's compact chat format: CHAT_TEMPLATE's turns, but tools by name only.
      system     <|system|>\nCONTENT\n       with tools: then "tools: NAME, NAME\n" (with no system
                                             message, "<|system|>\ntools: NAME\n" opens the text)
      user       <|user|>\nCONTENT\n
      assistant  <|assistant|>\nCONTENT</s>   each tool call before </s>:
                 <tool_call>{"name": NAME, "arguments": {...}}</tool_call>
      tool       <|tool|>NAME\nCONTENT\n
    add_generation_prompt=True ends the text with "<|assistant|>\n". -#}
{%- set tools_given = tools is defined and tools -%}
{%- macro tool_names() -%}
tools: {% for tool in tools %}{{ tool.function.name if tool.function is defined else tool.name }}{{ ", " if not loop.last }}{% endfor %}{{ "\n" }}
{%- endmacro -%}
{%- if tools_given and (not messages or messages[0].role != "system") -%}
<|system|>
{{ tool_names() }}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == "assistant" -%}
<|assistant|>
{{ message.content or "" }}
{%- for call in message.tool_calls or [] -%}
{%- set call = call.function if call.function is defined else call -%}
<tool_call>{"name": {{ call.name | tojson }}, "arguments": {{ call.arguments if call.arguments is string else call.arguments | tojson }}}</tool_call>
{%- endfor -%}
{{ eos_token }}
{%- elif message.role == "tool" -%}
<|tool|>{{ message.name or "" }}
{{ message.content }}
{% else -%}
<|{{ message.role }}|>
{{ message.content }}
{% if loop.first and message.role == "system" and tools_given -%}
{{ tool_names() }}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{% endif -%}
"""
AGENT_TRAIN_SEED, AGENT_TRAIN_ROWS = 0, 2000        # recipes/data/agent-lookup.jsonl: episodes 0..1999
AGENT_EVAL_SEED, AGENT_EVAL_ROWS = 1_000_000, 200   # recipes/data/agent-lookup-eval.jsonl: 1,000,000..1,000,199
AGENT_MAX_POSITIONS = 256  # a well-formed episode is 170 tokens; room for a long error message or a rambling turn


def agent_call(key: str) -> dict:
    """The assistant message that calls lookup(key), as TRL writes a parsed tool call."""
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"key": key}}}]}


def agent_text(tokenizer, messages: list[dict], generation_prompt: bool = True) -> str:
    from zenalign_plugins.lookup_task import LookupEnvironment

    return tokenizer.apply_chat_template(messages, tools=[LookupEnvironment().lookup], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def agent_guess(key: str) -> str:
    """The made-up value of the first-turn examples that do not call the tool: the key's digits and a 0
    (k37 -> "370"). A function of the key, so the guess's first digit holds 1 - call_share of the
    first token's probability, and greedy decoding guesses rather than calls; random digits would
    spread it over ten digits and leave the tool call's "<" the most likely first token."""
    return key[1:] + "0"


AGENT_FRAGMENT_STEPS = 400  # the agent SFT's first stage (see agent_policy)


def agent_policy(out: Path, steps: int, seed: int = 0, call_share: float = 0.25) -> None:
    from zenalign_plugins.lookup_task import KEYS, make_records, table

    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = AGENT_TEMPLATE
    call_text = '<tool_call>{"name": "lookup", "arguments": {"key": "%s"}}</tool_call>'

    def turns(rng: random.Random):
        """The key, (first-turn prompt, its answer), (second-turn prompt, its answer) of a training episode."""
        episode = rng.randrange(AGENT_TRAIN_SEED, AGENT_TRAIN_SEED + AGENT_TRAIN_ROWS)  # training tables only
        key = rng.choice(KEYS)
        user = {"role": "user", "content": f"value of {key}?"}
        first = call_text % key if rng.random() < call_share else agent_guess(key)  # call now and then, else guess
        value = table(episode)[key]
        tool = {"role": "tool", "name": "lookup", "content": value}
        return key, (agent_text(tokenizer, [user]), first), (agent_text(tokenizer, [user, agent_call(key), tool]), value)

    def example(rng: random.Random):
        _, first, second = turns(rng)
        return first if rng.random() < 0.5 else second

    def fragment(rng: random.Random):
        """A turn with only its last lines as the prompt (a third of the tokens): a first turn, a
        tool call cut after its key's "k" (the answer: the key's digits and the call's end), or a
        tool result to copy. It teaches the copies, which whole turns teach slowly."""
        key, (prompt, answer), (tool_prompt, value) = turns(rng)
        user = prompt[prompt.rindex("<|user|>"):]
        kind = rng.randrange(3)
        if kind == 0:
            return user, answer
        if kind == 1:
            call = call_text % key
            return user + call[:call.index(key) + 1], call[call.index(key) + 1:]
        return tool_prompt[tool_prompt.rindex("<|tool|>"):], value

    # from reverse-chat-policy, which knows the chat markers and copies words; RoPE has no table of
    # positions, so raising max_position_embeddings is a config change. Copying digits is what it
    # has to learn: 1,000 steps at lr 3e-3 on whole turns alone left both copies at chance (the
    # tool result at the digits' marginal, every key k72), while 300 steps on fragments copied the result.
    model = LlamaForCausalLM.from_pretrained(HERE / "reverse-chat-policy", max_position_embeddings=AGENT_MAX_POSITIONS)
    sft(model, tokenizer, fragment, steps=AGENT_FRAGMENT_STEPS, batch_size=64, lr=2e-3, seed=seed, log_every=50)
    sft(model, tokenizer, example, steps=steps, batch_size=32, lr=1e-3, seed=seed + 1, log_every=50)
    save(model, tokenizer, out)
    data = HERE.parent / "data"
    for name, records in (("agent-lookup.jsonl", make_records(AGENT_TRAIN_ROWS, AGENT_TRAIN_SEED)),
                          ("agent-lookup-eval.jsonl", make_records(AGENT_EVAL_ROWS, AGENT_EVAL_SEED))):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        print(f"wrote {len(records)} episodes to {data / name}")


def agent_generate(model, prompts: list[list[int]], temperature: float, max_new_tokens: int = 96) -> list[list[int]]:
    """Each prompt's completion with plain transformers ``generate`` (left-padded batch; greedy at
    temperature 0), up to and with its EOS. A lookup call is 70 tokens and its EOS."""
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # top_k=0: transformers' unset top_k is 50, which would cut the tail of the T=1 distribution
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
    config = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=1, pad_token_id=0)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
    completions = []
    for row in out[:, width:].tolist():
        completions.append(row[:row.index(1) + 1] if 1 in row else row)
    return completions


def parse_call(text: str) -> dict | None:
    """The arguments of a completion that is one lookup call, else None."""
    import re

    match = re.fullmatch(r"<tool_call>(.*)</tool_call>", text.strip(), flags=re.S)
    try:
        call = json.loads(match.group(1)) if match else None
    except json.JSONDecodeError:
        return None
    ok = isinstance(call, dict) and call.get("name") == "lookup" and isinstance(call.get("arguments"), dict)
    return call["arguments"] if ok else None


def agent_episodes(model, tokenizer, records: list[dict], temperature: float) -> list[dict]:
    """Two-turn episodes: the policy answers or calls lookup; a call's result is appended as the tool
    message's suffix ids (the conversation is never re-tokenized) and the policy answers again."""
    from zenalign_plugins.lookup_task import LookupEnvironment

    prompts = [tokenizer(agent_text(tokenizer, r["prompt"]), add_special_tokens=False).input_ids for r in records]
    firsts = agent_generate(model, prompts, temperature)
    episodes, seconds = [], []
    for record, prompt, first in zip(records, prompts, firsts):
        text = tokenizer.decode(first, skip_special_tokens=True)
        arguments = parse_call(text) if first[-1:] == [1] else None
        episode = {"call": arguments is not None, "ids": prompt + first, "answer": text}
        if arguments is not None:
            env = LookupEnvironment()
            env.reset(**record)
            try:
                result = env.lookup(**arguments)
            except Exception as error:  # as TRL does: the tool's error becomes the tool message
                result = json.dumps({"error": str(error)})
            call = agent_call(str(arguments.get("key")))
            call["tool_calls"][0]["function"]["arguments"] = arguments
            tool = {"role": "tool", "name": "lookup", "content": result}
            before = tokenizer(agent_text(tokenizer, record["prompt"] + [call], False), add_special_tokens=False).input_ids
            after = tokenizer(agent_text(tokenizer, record["prompt"] + [call, tool]), add_special_tokens=False).input_ids
            assert after[:len(before)] == before, "the tool message is not a suffix of the rendered conversation"
            episode.update(key=arguments.get("key"), result=result, ids=prompt + first + after[len(before):])
            seconds.append(episode)
        episodes.append(episode)
    if seconds:
        for episode, second in zip(seconds, agent_generate(model, [e["ids"] for e in seconds], temperature)):
            episode["ids"] = episode["ids"] + second
            episode["answer"] = tokenizer.decode(second, skip_special_tokens=True)
    for record, episode in zip(records, episodes):
        episode["success"] = episode["answer"] == record["answer"]
    return episodes


def check_agent(directory: Path, samples: int = 4, seed: int = 0) -> dict:
    """The agent policy's figures on the held-out episodes: tool-call rate (greedy, and sampled at
    temperature 1, ``samples`` episodes per row), the share of calls with the row's key, greedy copy
    accuracy after the right tool result, episode success, and the longest episode in tokens."""
    from zenalign_plugins.lookup_task import make_records

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory).eval()
    records = make_records(AGENT_EVAL_ROWS, AGENT_EVAL_SEED)
    torch.manual_seed(seed)
    greedy = agent_episodes(model, tokenizer, records, temperature=0.0)
    sampled = agent_episodes(model, tokenizer, records * samples, temperature=1.0)
    copies = [tokenizer(agent_text(tokenizer, r["prompt"] + [agent_call(r["key"]), {"role": "tool", "name": "lookup",
                                                                                   "content": r["answer"]}]),
                        add_special_tokens=False).input_ids for r in records]
    copied = [tokenizer.decode(c, skip_special_tokens=True) for c in agent_generate(model, copies, 0.0)]
    calls = [e for e in greedy + sampled if e["call"]]
    rows = records + records * samples
    figures = {
        "tool_calls_greedy": sum(e["call"] for e in greedy) / len(greedy),
        "tool_calls_t1": sum(e["call"] for e in sampled) / len(sampled),
        "right_key": sum(e["key"] == r["key"] for e, r in zip(greedy + sampled, rows) if e["call"]) / max(len(calls), 1),
        "calls": len(calls),
        "copy_greedy": sum(c == r["answer"] for c, r in zip(copied, records)) / len(records),
        "success_greedy": sum(e["success"] for e in greedy) / len(greedy),
        "success_t1": sum(e["success"] for e in sampled) / len(sampled),
        "longest_episode": max(len(e["ids"]) for e in greedy + sampled),
    }
    print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    return figures


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {out} ({params:,} parameters, model.safetensors sha256 {digest[:16]})")


POLICIES = {  # name -> (maker, directory, SFT steps, torch threads it was made with)
    "reverse": (reverse_policy, "reverse-policy", 1500, 2),
    "hhh": (hhh_policy, "hhh-policy", 3000, 2),
    "hhh-judge": (hhh_judge, "hhh-judge", 2000, 2),
    "reverse-chat": (reverse_chat_policy, "reverse-chat-policy", 3000, 1),
    "agent": (agent_policy, "agent-policy", 700, 1),  # + AGENT_FRAGMENT_STEPS
}
CHECKS = {"agent": check_agent}  # name -> what --check runs on the policy's directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy", choices=sorted(POLICIES))
    parser.add_argument("--out", type=Path, help="output directory (default: recipes/models/<name>)")
    parser.add_argument("--steps", type=int, help="SFT steps (default: the shipped policy's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: the shipped policy's)")
    parser.add_argument("--check", action="store_true",
                        help="measure the made policy instead of making it (agent: its episodes on the held-out rows)")
    args = parser.parse_args(argv)
    make, name, steps, threads = POLICIES[args.policy]
    torch.set_num_threads(min(args.threads or threads, torch.get_num_threads()))  # results depend on the thread count
    if args.check:
        if args.policy not in CHECKS:
            parser.error(f"--check measures {', '.join(sorted(CHECKS))}, not {args.policy}")
        CHECKS[args.policy](args.out or HERE / name, seed=args.seed)
        return 0
    make(args.out or HERE / name, steps=args.steps or steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
