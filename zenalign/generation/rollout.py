"""Group sampling: k completions per prompt with ``generate`` (KV cache, left padding).

Sampling is Gumbel-max over greedy decoding (see ``zenalign.generation.gumbel``): each completion is a
function of its key alone, so it does not depend on batch layout, process count or RNG state.
The distribution is set explicitly here (temperature, top-k, top-p and nothing else) rather than
inherited from the model's generation_config, so the log-probabilities the loss computes are
those of the distribution the completions were actually drawn from.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from zenalign.generation.decode import sample_loop
from zenalign.generation.gumbel import GumbelSampler
from zenalign.models.lean import LeanDecoder, checked_lean_model
from zenalign.models.primitives import accepts_logits_to_keep, cache_argument, full_attention_only, new_cache
from zenalign.recipe.schema import SamplingSection


@dataclass
class Rollout:
    """Sampled completions, laid out group by group (rows g*G .. g*G+G-1 share a prompt).

    ``sequences`` is the prompt (left-padded) followed by the completion (right-padded), so
    the completion tokens are ``sequences[:, prompt_length:]``.
    """

    sequences: torch.Tensor  # (N, Tp + Tc)
    attention_mask: torch.Tensor  # (N, Tp + Tc): prompt padding and post-EOS padding are 0
    prompt_length: int  # Tp
    completion_mask: torch.Tensor  # (N, Tc): 1 for the completion's tokens (the policy's or inserted) up to its end
    truncated: torch.Tensor  # (N,) bool: no EOS within max_new_tokens
    completions: list[str]  # decoded, EOS and padding removed
    completion_ids: list[list[int]]  # token ids, EOS and padding removed
    # (N, Tc): the log-prob each token was drawn with by a sampler other than the trainer's forward
    # (vLLM), 0 at padding; None when the trainer's own model sampled (its pi_old is exact)
    sampler_logp: Optional[torch.Tensor] = None
    # (N, Tc): 1 on the tokens the policy sampled, 0 on tokens inserted into the completion region
    # (tool results, environment text, the next turn's chat headers) and on padding; None: every
    # completion token is the policy's (see ``policy_token_mask``)
    policy_mask: Optional[torch.Tensor] = None
    # multi-turn episodes (zenalign.generation.environment.EpisodeLog): each row's messages, turns and
    # tool calls, and its episode object; None for one-turn completions
    episodes: Any = None
    # the policy version that sampled the batch: the number of training steps behind the weights it was
    # drawn with (``sampling.lag``: a step n batch comes from version n - 1 - lag); None when not recorded
    policy_version: Optional[int] = None

    @property
    def completion_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def policy_token_mask(self) -> torch.Tensor:
        """``(N, Tc)``: the tokens the policy sampled, the only ones that get a gradient or count in a
        statistic; ``completion_mask`` (every completion token up to the end) without a ``policy_mask``."""
        return self.completion_mask if self.policy_mask is None else self.policy_mask

    @property
    def policy_lengths(self) -> torch.Tensor:
        """``(N,)``: how many tokens the policy sampled in each completion, its EOS included."""
        return self.policy_token_mask.sum(dim=1)

    def scored_lengths(self) -> list[int]:
        """Each completion's policy tokens without its final EOS, as a reward source reads them
        (``ScoreBatch.policy_lengths``): ``len(completion_ids[i])`` less the tokens inserted into it."""
        inserted = (self.completion_mask.sum(dim=1) - self.policy_lengths).tolist()
        return [len(ids) - int(k) for ids, k in zip(self.completion_ids, inserted)]

    def __len__(self) -> int:
        return self.sequences.shape[0]


def completion_mask_from(tokens: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real completion tokens, ``(N, Tc)``: everything up to and including the first EOS.

    Returns the mask and a ``(N,)`` flag for completions with no EOS (cut at max_new_tokens).
    """
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, tokens.shape[1], dtype=torch.long))
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
    mask = (positions <= first_eos.unsqueeze(1)).long()
    return mask, ~has_eos


def generation_config(sampling: SamplingSection, eos_ids: Sequence[int], pad_id: int):
    """Greedy decoding with the KV cache; sampling comes from the Gumbel logits processor."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )


@contextmanager
def neutral_generation_defaults(model: torch.nn.Module):
    """Hide the model's own generation_config while we generate.

    transformers fills every attribute our config leaves unset from ``model.generation_config``
    (a checkpoint's repetition_penalty, top_k, min_new_tokens, ...). Those would silently change
    the sampled distribution away from the one the loss differentiates, so during sampling the
    model's defaults are replaced by an empty config.
    """
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def decode_groups(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    processors: Any,
    static_cache: bool = True,
    lean: bool = True,
) -> torch.Tensor:
    """Greedy decoding over processed scores with a KV cache: what ``generate`` does for this
    configuration, with nothing else per token.

    ``prompt_ids`` holds each distinct prompt once, ``(P, Tp)``; every prompt gets ``group_size``
    rows, prompt-major. The prompts are prefilled once and their KV cache (and the logits of
    their last position) repeated out to the group, so a group of k costs one prefill, not k.
    Each step then runs one forward pass over the newest token (the LM head on that position
    only), applies the logits processors (the Gumbel sampler) and takes the argmax. Rows that
    have emitted an EOS continue with padding; the loop stops when every row has finished.
    Position ids follow the attention mask, as in ``generate``. Returns ``(P*k, Tp + T)`` ids.

    The decoding cache is preallocated (``static_cache``, see :func:`grouped_cache`) where the
    model's cache allows it, so a step writes one column instead of copying the whole cache.
    With ``lean`` and an eligible model, the same loop runs on :mod:`zenalign.models.lean`
    (:class:`~zenalign.models.lean.decode.LeanDecoder`).
    """
    device = prompt_ids.device
    eos = torch.tensor(list(eos_ids), device=device)
    fast = checked_lean_model(model, prompt_ids, prompt_mask) if lean else None
    if fast is not None:
        with torch.inference_mode():  # the lean cache is written in place by every step
            tokens, logits, step_logits = LeanDecoder(fast).start(prompt_ids, prompt_mask, group_size, max_new_tokens)
            return sample_loop(tokens, logits, step_logits, max_new_tokens, eos, pad_id, processors)
    cache_name = cache_argument(type(model))
    head = {"logits_to_keep": 1} if accepts_logits_to_keep(type(model)) else {}  # LM head on the last position only
    cache = new_cache(model)
    positions = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                **head, **{cache_name: cache})
    logits = out.logits[:, -1, :].repeat_interleave(group_size, dim=0)
    tokens = prompt_ids.repeat_interleave(group_size, dim=0)
    mask = prompt_mask.repeat_interleave(group_size, dim=0)
    cache, static = grouped_cache(model, cache, group_size, prompt_ids.shape[1] + max_new_tokens, static_cache)
    if static:  # columns past the current token are never attended (causal): the mask can be 1 from the start
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], max_new_tokens)], dim=1)
    state = {"mask": mask, "positions": positions[:, -1:].repeat_interleave(group_size, dim=0)}

    def step_logits(previous: torch.Tensor) -> torch.Tensor:
        if not static:
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(state["mask"].shape[0], 1)], dim=1)
        state["positions"] = state["positions"] + 1
        out = model(input_ids=previous[:, None], attention_mask=state["mask"], position_ids=state["positions"],
                    use_cache=True, **head, **{cache_name: cache})
        return out.logits[:, -1, :]

    return sample_loop(tokens, logits, step_logits, max_new_tokens, eos, pad_id, processors)


def grouped_cache(model, cache, group_size: int, max_length: int, static: bool = True):
    """The prefilled cache with each row repeated ``group_size`` times, and whether it is static.

    Static: a transformers ``StaticCache`` of ``max_length`` columns, filled with the prompts'
    keys and values. Caches with other than plain full-attention layers (sliding windows, linear
    attention) keep their dynamic form, repeated in place.
    """
    if static and full_attention_only(cache):
        from transformers import StaticCache

        grouped = StaticCache(config=model.config, max_cache_len=max_length)
        if len(grouped.layers) == len(cache.layers):
            for source, target in zip(cache.layers, grouped.layers):
                target.update(source.keys.repeat_interleave(group_size, dim=0),
                              source.values.repeat_interleave(group_size, dim=0))
            return grouped, True
    cache.batch_repeat_interleave(group_size)
    return cache, False


def decode_without_special_tokens(tokenizer: Any, ids: list[list[int]]) -> list[str]:
    """``tokenizer.batch_decode(ids, skip_special_tokens=True)``, the same strings.

    transformers' Python tokenizers (ByT5, the slow ones) rebuild the set of special ids for
    every sequence they decode, most of the cost of decoding a step's completions (measurements:
    docs/performance-notes.md); for them the special ids are dropped here, once, and the rest decoded
    as they are. That is all ``skip_special_tokens`` does in their ``convert_ids_to_tokens``, so
    this path is taken only when the tokenizer's class keeps transformers' own decoding methods.
    Other tokenizers (Rust-backed ones skip inside their decoder) are called as usual."""
    if not _skips_special_ids_by_filtering(type(tokenizer)):
        return tokenizer.batch_decode(ids, skip_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    return tokenizer.batch_decode([[i for i in row if i not in special] for row in ids], skip_special_tokens=False)


def _skips_special_ids_by_filtering(cls: type) -> bool:
    try:
        from transformers.tokenization_python import PythonBackend
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:  # transformers 4: its Python tokenizers decode differently; use batch_decode as it is
        return False
    return (issubclass(cls, PythonBackend)
            and all(getattr(cls, name) is getattr(PythonBackend, name) for name in ("_decode", "convert_ids_to_tokens"))
            and all(getattr(cls, name) is getattr(PreTrainedTokenizerBase, name) for name in ("decode", "batch_decode")))


def encode_prompts(tokenizer: Any, prompts: list[str], max_length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' ids and attention mask, left-padded, ``(P, Tp)`` each. With ``max_length``, a
    longer prompt keeps only its last ``max_length`` tokens (TRL's left truncation): the padding is
    on the left, so the last columns hold the end of every prompt."""
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]                    # (P, Tp)
    if max_length is not None and ids.shape[1] > max_length:
        ids, mask = ids[:, -max_length:], mask[:, -max_length:]                    # (P, max_length)
    return ids, mask


def generate_groups(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    sampling: SamplingSection,
    eos_ids: Sequence[int],
    group_size: int,
    keys: torch.Tensor | None = None,
    autocast: Any = None,
    synced_gpus: bool = False,
    lean_forward: bool = True,
) -> Rollout:
    """Sample ``group_size`` completions per prompt, one per key (rows prompt-major: the keys of
    prompt p are ``keys[p*G:(p+1)*G]``); without keys, one greedy completion per prompt."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in encode_prompts(tokenizer, prompts, sampling.max_prompt_length))  # (P, Tp)
    input_ids = ids.repeat_interleave(group_size, dim=0)  # (N, Tp), prompt-major
    prompt_mask = mask.repeat_interleave(group_size, dim=0)
    processors = LogitsProcessorList()
    if keys is not None:
        if keys.numel() != input_ids.shape[0]:
            raise ValueError(f"{keys.numel()} sampling keys for {len(prompts)} prompts x {group_size} completions")
        keys = keys.to(device, non_blocking=True)  # here, not at the decode loop's first token (a wait there)
        processors.append(GumbelSampler(keys, input_ids.shape[1], sampling.temperature, sampling.top_k, sampling.top_p))
    was_training = model.training
    model.eval()
    own_loop = sampling.decoder == "zenalign" and not synced_gpus and cache_argument(type(model)) is not None
    with autocast or nullcontext():
        if own_loop:
            with torch.inference_mode():
                sequences = decode_groups(model, ids, mask, group_size,
                                        sampling.max_new_tokens, eos_ids, tokenizer.pad_token_id, processors,
                                        lean=lean_forward)
            sequences = sequences.clone()  # a normal tensor again: the update differentiates through it
        else:
            with neutral_generation_defaults(model):
                sequences = model.generate(
                    input_ids=input_ids,
                    attention_mask=prompt_mask,
                    generation_config=generation_config(sampling, eos_ids, tokenizer.pad_token_id),
                    logits_processor=processors,
                    synced_gpus=synced_gpus,
                )
    model.train(was_training)
    return rollout_from(sequences, prompt_mask, eos_ids, tokenizer)


def rollout_from(sequences: torch.Tensor, prompt_mask: torch.Tensor, eos_ids: Sequence[int], tokenizer: Any,
                 ends: Optional[torch.Tensor] = None, truncated: Optional[torch.Tensor] = None) -> Rollout:
    """A :class:`Rollout` from decoded ``(N, Tp + T)`` ids and the prompts' ``(N, Tp)`` mask:
    completion masks up to each EOS, columns that are padding in every row trimmed, texts decoded.

    ``ends`` ``(N,)``: each completion's length instead, for rows whose completion region runs past
    their first EOS (an episode's rows hold one per policy turn); then ``truncated`` ``(N,)`` gives
    their flags (default: the row does not end with an EOS)."""
    prompt_length = prompt_mask.shape[1]
    tokens = sequences[:, prompt_length:]
    if ends is None:
        mask, truncated = completion_mask_from(tokens, eos_ids)
        final_eos = ~truncated
    else:
        ends = ends.to(tokens.device)
        mask = (torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < ends.unsqueeze(1)).long()
        last = torch.nn.functional.pad(tokens, (1, 0), value=-1).gather(1, ends.unsqueeze(1)).squeeze(1)  # -1: empty
        final_eos = torch.isin(last, torch.tensor(list(eos_ids), device=tokens.device))
        truncated = ~final_eos if truncated is None else truncated.to(tokens.device, torch.bool)
    # Trim columns that are padding in every row (all completions ended early).
    keep = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    tokens, mask = tokens[:, :keep], mask[:, :keep]
    sequences = torch.cat([sequences[:, :prompt_length], tokens], dim=1)
    lengths = mask.sum(dim=1) - final_eos.long()  # real tokens without the final EOS
    # one copy to the host, not one per row (each a wait for the device on a GPU)
    ids = [row[:n] for row, n in zip(tokens.cpu().tolist(), lengths.tolist())]
    texts = decode_without_special_tokens(tokenizer, ids)
    return Rollout(
        sequences=sequences,
        attention_mask=torch.cat([prompt_mask, mask], dim=1),
        prompt_length=prompt_length,
        completion_mask=mask,
        truncated=truncated,
        completions=texts,
        completion_ids=ids,
    )


def _rows(rollout: Rollout, values: Optional[torch.Tensor]) -> list[list]:
    """Each completion's ``values`` ``(N, Tc)`` up to and including its EOS ([] each for None)."""
    if values is None:
        return [[] for _ in range(len(rollout))]
    lengths = rollout.completion_mask.sum(dim=1).tolist()
    return [row[: int(n)].tolist() for row, n in zip(values.cpu(), lengths)]


def completion_rows(rollout: Rollout) -> list[list[int]]:
    """Each completion's tokens up to and including its EOS (what :func:`rollout_from_rows` takes back)."""
    return _rows(rollout, rollout.completion_tokens)


def sampler_logp_rows(rollout: Rollout) -> list[list[float]]:
    """Each completion's sampler log-probs, as long as its :func:`completion_rows` row ([] without any)."""
    return _rows(rollout, rollout.sampler_logp)


def policy_mask_rows(rollout: Rollout) -> list[list[int]]:
    """Each completion's ``policy_mask``, as long as its :func:`completion_rows` row ([] without one:
    every token is the policy's)."""
    return _rows(rollout, rollout.policy_mask)


def _padded(rows: list[list], shape: torch.Size, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """``rows`` right-padded with 0 into a ``shape`` tensor."""
    out = torch.zeros(shape, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out.to(device)


def prompt_rows(rollout: Rollout) -> list[list[int]]:
    """Each row's prompt tokens, without the padding."""
    prompts, mask = rollout.sequences[:, : rollout.prompt_length].cpu(), rollout.attention_mask[:, : rollout.prompt_length].cpu()
    return [row[m.bool()].tolist() for row, m in zip(prompts, mask)]


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def rollout_from_rows(tokenizer: Any, prompts: list[str], rows: list[list[int]], group_size: int,
                      eos_ids: Sequence[int], device: Any = None,
                      sampler_rows: Optional[list[list[float]]] = None, max_prompt_length: Optional[int] = None,
                      policy_rows: Optional[list[list[int]]] = None,
                      truncated: Optional[torch.Tensor] = None,
                      prompt_rows: Optional[list[list[int]]] = None) -> Rollout:
    """A :class:`Rollout` of ``group_size`` completions per prompt from their token rows (see
    :func:`completion_rows`): the prompts encoded as for sampling (left-padded, truncated to
    ``max_prompt_length``), the completions right-padded. Groups drawn in different rounds or on
    different processes join one batch this way. ``sampler_rows`` (see :func:`sampler_logp_rows`)
    rebuild ``sampler_logp``; ``policy_rows`` (see :func:`policy_mask_rows`) rebuild ``policy_mask``,
    and when there are any, each row is its whole completion (an episode's holds an EOS per turn),
    with the ``(N,)`` flags ``truncated`` (default: see :func:`rollout_from`). ``prompt_rows`` (see
    :func:`prompt_rows`), one per completion, replace ``prompts`` where each episode had its own."""
    if prompt_rows is not None:  # episodes: each row's own prompt, as it was sampled (with tools, observation)
        prompt_ids, prompt_mask = _left_padded(prompt_rows, tokenizer.pad_token_id)
    else:
        ids, mask = encode_prompts(tokenizer, prompts, max_prompt_length)
        prompt_ids = ids.repeat_interleave(group_size, dim=0)   # (N, Tp)
        prompt_mask = mask.repeat_interleave(group_size, dim=0)
    width = max((len(row) for row in rows), default=0)
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=prompt_ids.dtype)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=prompt_ids.dtype)
    sequences = torch.cat([prompt_ids, tokens], dim=1).to(device)
    episodes = policy_rows is not None and any(policy_rows)
    ends = torch.tensor([len(row) for row in rows], dtype=torch.long) if episodes else None
    rollout = rollout_from(sequences, prompt_mask.to(device), eos_ids, tokenizer, ends, truncated)
    shape = rollout.completion_mask.shape                                                   # (N, Tc)
    if sampler_rows is not None and all(len(lp) == len(row) for lp, row in zip(sampler_rows, rows)):
        rollout.sampler_logp = _padded(sampler_rows, shape, torch.float32, rollout.completion_mask.device)
    if episodes:
        policy_rows = [m or [1] * len(row) for m, row in zip(policy_rows, rows)]  # []: a rollout without a policy_mask
        if not all(len(m) == len(row) for m, row in zip(policy_rows, rows)):
            raise ValueError("a policy mask row is not as long as its completion row (see policy_mask_rows)")
        rollout.policy_mask = _padded(policy_rows, shape, rollout.completion_mask.dtype, rollout.completion_mask.device)
    return rollout
