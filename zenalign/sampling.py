"""Group sampling: k completions per prompt with ``generate`` (KV cache, left padding).

Sampling is Gumbel-max over greedy decoding (see ``zenalign.gumbel``): each completion is a
function of its key alone, so it does not depend on batch layout, process count or RNG state.
The distribution is set explicitly here (temperature, top-k, top-p and nothing else) rather than
inherited from the model's generation_config, so the log-probabilities the loss computes are
those of the distribution the completions were actually drawn from.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from zenalign.gumbel import GumbelSampler


@dataclass
class Rollout:
    """Sampled completions, laid out group by group (rows g*G .. g*G+G-1 share a prompt).

    ``sequences`` is the prompt (left-padded) followed by the completion (right-padded), so
    the completion tokens are ``sequences[:, prompt_length:]``.
    """

    sequences: torch.Tensor  # (N, Tp + Tc)
    attention_mask: torch.Tensor  # (N, Tp + Tc): prompt padding and post-EOS padding are 0
    prompt_length: int  # Tp
    completion_mask: torch.Tensor  # (N, Tc): 1 for completion tokens up to and including EOS
    truncated: torch.Tensor  # (N,) bool: no EOS within max_new_tokens
    completions: list[str]  # decoded, EOS and padding removed
    completion_ids: list[list[int]]  # token ids, EOS and padding removed

    @property
    def completion_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

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


def generation_config(sampling: Any, eos_ids: Sequence[int], pad_id: int):
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


@torch.no_grad()
def generate_groups(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    sampling: Any,
    eos_ids: Sequence[int],
    group_size: int,
    keys: torch.Tensor | None = None,
    autocast: Any = None,
    synced_gpus: bool = False,
) -> Rollout:
    """Sample ``group_size`` completions per prompt, one per key (rows prompt-major: the keys of
    prompt p are ``keys[p*G:(p+1)*G]``); without keys, one greedy completion per prompt."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
    input_ids = encoded["input_ids"].repeat_interleave(group_size, dim=0)  # (N, Tp), prompt-major
    prompt_mask = encoded["attention_mask"].repeat_interleave(group_size, dim=0)
    processors = LogitsProcessorList()
    if keys is not None:
        if keys.numel() != input_ids.shape[0]:
            raise ValueError(f"{keys.numel()} sampling keys for {len(prompts)} prompts x {group_size} completions")
        processors.append(GumbelSampler(keys, input_ids.shape[1], sampling.temperature, sampling.top_k, sampling.top_p))
    was_training = model.training
    model.eval()
    with autocast or nullcontext(), neutral_generation_defaults(model):
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            generation_config=generation_config(sampling, eos_ids, tokenizer.pad_token_id),
            logits_processor=processors,
            synced_gpus=synced_gpus,
        )
    model.train(was_training)
    prompt_length = input_ids.shape[1]
    tokens = sequences[:, prompt_length:]
    mask, truncated = completion_mask_from(tokens, eos_ids)
    # Trim columns that are padding in every row (all completions ended early).
    keep = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    tokens, mask = tokens[:, :keep], mask[:, :keep]
    sequences = torch.cat([sequences[:, :prompt_length], tokens], dim=1)
    lengths = mask.sum(dim=1) - (~truncated).long()  # real tokens without the EOS
    ids = [row[: int(n)].tolist() for row, n in zip(tokens, lengths)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return Rollout(
        sequences=sequences,
        attention_mask=torch.cat([prompt_mask, mask], dim=1),
        prompt_length=prompt_length,
        completion_mask=mask,
        truncated=truncated,
        completions=texts,
        completion_ids=ids,
    )
