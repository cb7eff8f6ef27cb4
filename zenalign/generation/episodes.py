"""Multi-turn episodes, token in and token out.

An episode's tokens are never re-rendered from text. Each turn appends exactly the tokens the
policy sampled (up to and including its end-of-turn EOS); when the turn calls tools, the tools run
and their messages are appended as the chat template's own suffix for them (rendered once, as
TRL's ``_get_tool_suffix_ids`` does: the template's text for the tool messages and the next
assistant header, after a conversation ending at an assistant turn), and the policy goes on. So
the rows the update trains on are the sampled tokens, whatever a chat template would do to
earlier turns if the conversation were rendered again (Qwen3 drops old ``<think>`` blocks).
``Rollout.policy_mask`` is 1 on the policy's tokens and 0 on the inserted ones.

:class:`TurnDecoder` decodes every row of the batch together with one KV cache that continues
across turns: between turns it prefills only the inserted tokens (each row's block left-padded to
the longest, the padding masked out), so a turn costs its new tokens, not the whole conversation.
Each token's Gumbel noise is keyed by the completion's key and the number of tokens the row has
sampled before it (:meth:`~zenalign.generation.gumbel.GumbelSampler.choose_at`), so an episode is
a function of its key, its record and its environment alone: the same on 1 or 2 processes and
after a resume. It runs on transformers' forward (the lean forward's preallocated cache does not
take inserted tokens).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Optional, Sequence

import torch

from zenalign.data import prompt_messages
from zenalign.errors import DataError
from zenalign.generation.decode import RowsEnded
from zenalign.generation.environment import Environments, EpisodeLog
from zenalign.generation.gumbel import GumbelSampler
from zenalign.generation.rollout import Rollout
from zenalign.generation.tools import call_tool, parse_tool_calls
from zenalign.models.primitives import cache_argument, new_cache
from zenalign.recipe.schema import SamplingSection


class TurnDecoder:
    """Decodes N rows turn by turn over one continuing KV cache (transformers' forward)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_ids: Sequence[int]):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.eos = torch.tensor(list(eos_ids), device=self.device)
        self.cache_name = cache_argument(type(model))
        self.cache = new_cache(model)
        self.mask: Optional[torch.Tensor] = None  # (N, S): 1 on the cache's real columns
        self.next_position: Optional[torch.Tensor] = None  # (N,) the position of each row's next token

    def feed(self, blocks: list[list[int]]) -> torch.Tensor:
        """Append each row's block of tokens (left-padded to the longest; [] for a row with nothing
        to add) and return each row's next-token logits ``(N, V)`` (meaningless for empty rows)."""
        n, width = len(blocks), max(len(b) for b in blocks)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        real = torch.zeros((n, width), dtype=torch.long)
        for i, block in enumerate(blocks):
            if block:
                ids[i, width - len(block):] = torch.tensor(block)
                real[i, width - len(block):] = 1
        ids, real = ids.to(self.device), real.to(self.device)
        start = self.next_position if self.next_position is not None else torch.zeros(n, dtype=torch.long,
                                                                                        device=self.device)
        positions = (start[:, None] + real.cumsum(1) - 1).clamp(min=0)
        return self._forward(ids, real, positions, real.sum(1))

    def step(self, tokens: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """One token per row (``fed`` False: a padding column the row does not attend to)."""
        fed = fed.long()
        return self._forward(tokens[:, None], fed[:, None], self.next_position[:, None], fed)

    def _forward(self, ids: torch.Tensor, real: torch.Tensor, positions: torch.Tensor,
                 added: torch.Tensor) -> torch.Tensor:
        self.mask = real if self.mask is None else torch.cat([self.mask, real], dim=1)
        self.next_position = (positions[:, -1] + 1) if self.next_position is None else self.next_position + added
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self.cache_name: self.cache})
        return out.logits[:, -1, :]

    def turn(self, logits: torch.Tensor, budget: torch.Tensor, sampled: torch.Tensor,
             sampler: Optional[GumbelSampler]) -> list[list[int]]:
        """Sample one assistant turn for every row with ``budget > 0``: tokens until an EOS or the
        row's budget. ``sampled`` ``(N,)`` counts each row's sampled tokens so far (the Gumbel
        position), and is advanced. Returns each row's new tokens ([] for rows not in this turn).
        The last token of each row is not fed yet: the next :meth:`feed` starts with it."""
        going = budget > 0
        left = budget.clone()
        chosen_at, going_at = [], []  # each step's tokens and which rows they belong to, read once at the end
        all_ended = RowsEnded(self.device)  # on a GPU, without waiting for the device at every token
        while True:
            scores = logits.float()
            chosen = scores.argmax(dim=-1) if sampler is None else sampler.choose_at(scores, sampled)
            chosen = torch.where(going, chosen, torch.full_like(chosen, self.pad_id))
            chosen_at.append(chosen)
            going_at.append(going)
            sampled += going.long()
            left -= going.long()
            going = going & ~(chosen[:, None] == self.eos).any(dim=1) & (left > 0)
            if all_ended(going):
                break
            logits = self.step(chosen, going)
        tokens, kept = torch.stack(chosen_at, dim=1).cpu(), torch.stack(going_at, dim=1).cpu()
        return [row[mask].tolist() for row, mask in zip(tokens, kept)]


def render_episode_prompt(record: dict[str, Any], tokenizer: Any, tools: list[Any], observation: Optional[str]) -> str:
    """The record's chat messages with the observation appended to the last one, through the chat
    template with the tools' schemas and the generation prompt."""
    messages = prompt_messages(record)
    if messages is None or getattr(tokenizer, "chat_template", None) is None:
        raise DataError("an environment needs chat prompts (a record's 'prompt' as a list of messages) and a tokenizer "
                        "with a chat template, to render tool messages; "
                        + ("this tokenizer has none" if messages is not None else "a record's 'prompt' is text"))
    if observation:
        last = messages[-1]
        messages = messages[:-1] + [{**last, "content": (last.get("content") or "") + observation}]
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)


class ToolSuffix:
    """The tokens the chat template puts after an assistant turn that called tools: the tool messages
    and the next assistant header. Rendered as a conversation ending at an assistant turn with a
    tool call, cut after that turn's last EOS, and the same conversation with the tool messages and
    the generation prompt: the second must extend the first, and the difference is the suffix."""

    def __init__(self, tokenizer: Any, eos_id: int):
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.prefixes: dict[str, list[int]] = {}  # by the first tool's name (some templates' headers name it)

    def _ids(self, messages: list[dict[str, Any]], generation: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, tool_messages: list[dict[str, Any]]) -> list[int]:
        call = {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]}
        head = [{"role": "user", "content": "x"}, call]
        prefix = self.prefixes.get(tool_messages[0]["name"])
        if prefix is None:
            prefix = self._ids(head, False)
            ends = [i for i, t in enumerate(prefix) if t == self.eos_id]
            prefix = self.prefixes[tool_messages[0]["name"]] = prefix[: ends[-1] + 1] if ends else prefix
        full = self._ids(head + tool_messages, True)
        if full[: len(prefix)] != prefix:
            raise DataError("the chat template renders an assistant turn differently once tool messages follow it, so "
                            "tool results cannot be appended as tokens; use a template whose tool messages are a suffix")
        return full[len(prefix):]


def run_episodes(model: torch.nn.Module, tokenizer: Any, records: list[dict[str, Any]], group_size: int,
                 keys: Optional[torch.Tensor], sampling: SamplingSection, environments: Environments,
                 eos_ids: Sequence[int], autocast: Any = None) -> Rollout:
    """``group_size`` episodes per record, one per key (rows prompt-major), or one greedy episode
    each without keys; a :class:`Rollout` whose completion region is each episode after its prompt,
    with ``policy_mask`` and ``episodes`` (an :class:`EpisodeLog`) filled in."""
    batch = EpisodeBatch(tokenizer, [r for r in records for _ in range(group_size)], environments, eos_ids,
                         sampling.max_prompt_length, getattr(getattr(model, "config", None), "max_position_embeddings", None))
    sampler = None
    if keys is not None:
        sampler = GumbelSampler(keys.to(torch.long), 0, sampling.temperature, sampling.top_k, sampling.top_p)
    was_training = model.training
    model.eval()
    try:
        with autocast or nullcontext(), torch.inference_mode():
            decoder = TurnDecoder(model, tokenizer.pad_token_id, eos_ids)
            logits = decoder.feed(batch.prompts)
            sampled = torch.zeros(len(batch), dtype=torch.long, device=decoder.device)
            for turn in range(1, environments.budgets.max_turns + 1):
                new = decoder.turn(logits, batch.budgets(sampling.max_new_tokens).to(decoder.device), sampled, sampler)
                blocks = [batch.after_turn(i, tokens, turn) for i, tokens in enumerate(new)]
                if all(batch.done):
                    break
                logits = decoder.feed(blocks)
    finally:
        model.train(was_training)
    return batch.rollout(decoder.device)


class EpisodeBatch:
    """A batch of episodes as they grow: each row's tokens after its prompt, which of them the
    policy sampled, and whether it has ended (and was cut short)."""

    def __init__(self, tokenizer: Any, records: list[dict[str, Any]], environments: Environments,
                 eos_ids: Sequence[int], max_prompt_length: Optional[int], context: Optional[int]):
        self.tokenizer, self.environments, self.eos = tokenizer, environments, set(eos_ids)
        self.suffix = ToolSuffix(tokenizer, eos_ids[0])
        n = len(records)
        episodes = [environments.open(record) for record in records]
        texts = [render_episode_prompt(r, tokenizer, list(e.tools.values()), e.observation)
                 for r, e in zip(records, episodes)]
        self.prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if max_prompt_length is not None:
            self.prompts = [p[-max_prompt_length:] for p in self.prompts]
        cap = environments.budgets.max_episode_tokens or 1 << 30
        self.caps = [min(cap, (context or 1 << 30) - len(p)) for p in self.prompts]
        self.log = EpisodeLog([[] for _ in range(n)], episodes, [0] * n, [0] * n, [0] * n, [0] * n, texts)
        self.region: list[list[int]] = [[] for _ in range(n)]  # each episode's tokens after its prompt
        self.policy: list[list[int]] = [[] for _ in range(n)]  # 1 where the policy sampled the token
        self.truncated, self.done = [False] * n, [False] * n

    def __len__(self) -> int:
        return len(self.prompts)

    def budgets(self, max_new_tokens: int) -> torch.Tensor:
        """How many tokens each row may sample this turn (0: it has ended)."""
        return torch.tensor([0 if self.done[i] else min(max_new_tokens - sum(self.policy[i]),
                                                        self.caps[i] - len(self.region[i])) for i in range(len(self))])

    def end(self, i: int, truncated: bool) -> list[int]:
        self.done[i], self.truncated[i] = True, truncated
        return []

    def after_turn(self, i: int, tokens: list[int], turn: int) -> list[int]:
        """Row ``i``'s turn ``turn`` sampled ``tokens``: record them, run the tools it called and
        append their messages, or end the episode. Returns the tokens to feed before the next turn
        (the turn's last token and the inserted ones), [] when the row does not go on."""
        if self.done[i]:
            return []
        if not tokens:  # no budget left for another turn
            return self.end(i, True)
        self.region[i] += tokens
        self.policy[i] += [1] * len(tokens)
        self.log.turns[i] = turn
        ended = tokens[-1] in self.eos
        text = self.tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False)
        content, calls = parse_tool_calls(text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in calls]
        self.log.messages[i].append(message)
        if not ended or not calls or turn == self.environments.budgets.max_turns:
            return self.end(i, not ended or bool(calls))
        inserted = run_tools(calls, self.log.episodes[i], self.environments.budgets, self.log, i)
        ids = self.suffix(inserted)
        if len(self.region[i]) + len(ids) >= self.caps[i]:  # no room for the messages and one more token
            return self.end(i, True)
        self.log.messages[i] += inserted
        self.region[i] += ids
        self.policy[i] += [0] * len(ids)
        return [tokens[-1]] + ids

    def rollout(self, device: Any) -> Rollout:
        return episode_rollout(self.tokenizer, self.prompts, self.region, self.policy, self.truncated, self.log,
                               self.eos, device)


def run_tools(calls: list[Any], episode: Any, budgets: Any, log: EpisodeLog, row: int) -> list[dict[str, Any]]:
    """Run one turn's tool calls in order; their tool messages, the outcomes counted in ``log``."""
    messages = []
    for call in calls:
        start = time.perf_counter()
        result = call_tool(call, episode.tools, budgets.tool_timeout_s, budgets.max_tool_output_chars)
        episode.seconds += time.perf_counter() - start
        log.calls[row] += 1
        log.errors[row] += result.status == "error"
        log.timeouts[row] += result.status == "timeout"
        messages.append({"role": "tool", "name": result.name, "content": result.content})
    return messages


def episode_rollout(tokenizer: Any, prompts: list[list[int]], region: list[list[int]], policy: list[list[int]],
                    truncated: list[bool], log: EpisodeLog, eos: set[int], device: Any) -> Rollout:
    """The episodes as a :class:`Rollout`: prompts left-padded, each episode's tokens after its
    prompt right-padded (no holes: the decoder's padding between turns is not part of a row)."""
    n, pad = len(prompts), tokenizer.pad_token_id
    tp, tc = max(map(len, prompts)), max(1, max(map(len, region)))
    ids = torch.full((n, tp + tc), pad, dtype=torch.long)
    attention = torch.zeros((n, tp + tc), dtype=torch.long)
    policy_mask = torch.zeros((n, tc), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, region)):
        ids[i, tp - len(p):tp] = torch.tensor(p, dtype=torch.long)
        attention[i, tp - len(p):tp] = 1
        if r:
            ids[i, tp:tp + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, tp:tp + len(r)] = 1
            policy_mask[i, :len(r)] = torch.tensor(policy[i], dtype=torch.long)
    finals = [next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "") for messages in log.messages]
    completion_ids = [r[:-1] if r and r[-1] in eos else list(r) for r in region]
    return Rollout(sequences=ids.to(device), attention_mask=attention.to(device), prompt_length=tp,
                   completion_mask=attention[:, tp:].to(device), truncated=torch.tensor(truncated, device=device),
                   completions=finals, completion_ids=completion_ids, policy_mask=policy_mask.to(device), episodes=log)

