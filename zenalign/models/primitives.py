"""What every model path shares: what a transformers forward accepts, KV caches, position ids
that follow an attention mask, the prompt groups of a GRPO batch, and the token loop every decoder
runs. Nothing here knows GRPO; the lean forward (:mod:`zenalign.models.lean`), the rollout and the
log-prob passes all build on it."""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class ChoosesTokens(Protocol):
    """A logits processor that picks the next tokens itself (the Gumbel sampler): last in the list
    the token loop is given, its ``choose`` replaces the argmax."""

    def choose(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor: ...


@lru_cache(maxsize=None)
def accepts_logits_to_keep(forward_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return False


@lru_cache(maxsize=None)
def cache_argument(forward_type: type) -> Optional[str]:
    """The name under which a model class's forward takes a KV cache (``cache`` in newer
    transformers, ``past_key_values`` before), or None if it takes neither (e.g. a DDP or
    DeepSpeed wrapper, whose forward is ``*args, **kwargs``)."""
    try:
        params = inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def new_cache(model: torch.nn.Module):
    """An empty transformers ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def full_attention_only(cache) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention ``DynamicLayer`` (known before
    any forward pass when the cache was built from the model's config): the layout whose rows
    can be gathered, repeated or copied into a ``StaticCache``. Sliding-window, linear-attention
    and lazily built caches are not."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow an attention mask: left padding does not shift positions."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_groups(sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int):
    """Rows whose prompt (tokens and mask) equals the previous row's share that prompt.

    Returns ``(leaders, owner)``: the first row of each run of equal prompts, and for every row
    the index (into ``leaders``) of its run. GRPO rollouts are prompt-major, so a run is a group.
    """
    prompts, masks = sequences[:, :prompt_length], attention_mask[:, :prompt_length]
    same = (prompts[1:] == prompts[:-1]).all(dim=1) & (masks[1:] == masks[:-1]).all(dim=1)
    starts = torch.cat([same.new_ones(1), ~same])
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1




def sample_loop(tokens: torch.Tensor, logits: torch.Tensor, step_logits: Any, max_new_tokens: int, eos: torch.Tensor,
                pad_id: int, processors: Any) -> torch.Tensor:
    """The token loop every decoder shares: from the prompts' last logits, pick each row's next
    token through the logits processors and an argmax, pad rows that have emitted an EOS, and stop
    when every row has ended; ``step_logits(tokens_just_chosen)`` runs the model one step. A last
    processor with a ``choose(input_ids, scores)`` method (the keyed sampler) picks the ids
    itself, with no scores built for the argmax."""
    unfinished = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    choose = _chooser(processors)
    all_ended = RowsEnded(tokens.device)
    for step in range(max_new_tokens):
        if step:
            logits = step_logits(next_tokens)
        next_tokens = choose(tokens, logits.float())
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_id))
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        unfinished &= ~(next_tokens[:, None] == eos).any(dim=1)  # isin, without its sorting path's syncs
        if all_ended(unfinished):
            break
    return tokens


class RowsEnded:
    """Whether every row of a decode has ended, asked once per token. On a CPU the flag is read
    at once. On a GPU reading it would make the host wait for the device at every token (a
    host-device sync, after which the GPU idles while the next token's kernels are launched), so
    there the flag is copied into pinned host memory without waiting and read once a CUDA event
    says the copy has landed: the loop stops a token or two after the last row ended. The tokens
    of those extra steps are padding in every row, which :func:`zenalign.grpo.rollout.rollout_from`
    trims."""

    def __init__(self, device: torch.device):
        self.lagged = device.type == "cuda"
        self.landed: Any = None  # the event recorded after the last copy
        self.host = torch.ones((), dtype=torch.bool, pin_memory=True) if self.lagged else None

    def __call__(self, unfinished: torch.Tensor) -> bool:
        if not self.lagged:
            return not bool(unfinished.any())
        if self.landed is not None:
            if not self.landed.query():  # the last copy is still on its way
                return False
            if not bool(self.host):  # a host tensor: no wait
                return True
        self.host.copy_(unfinished.any(), non_blocking=True)
        self.landed = torch.cuda.Event()
        self.landed.record()
        return False


def _chooser(processors: Any) -> Any:
    """``(input_ids, scores) -> ids``: the processors, then an argmax, or the last one's ``choose``."""
    if not isinstance(processors, list):
        return lambda input_ids, scores: processors(input_ids, scores).argmax(dim=-1)
    *others, last = processors or [None]
    if isinstance(last, ChoosesTokens):
        process = _each_in_turn(others)
        return lambda input_ids, scores: last.choose(input_ids, process(input_ids, scores))
    process = _each_in_turn(processors)
    return lambda input_ids, scores: process(input_ids, scores).argmax(dim=-1)


def _each_in_turn(processors: list) -> Any:
    """A list of logits processors (a ``LogitsProcessorList``) applied as that list applies them
    when given no extra arguments, without inspecting each one's signature on every token."""

    def process(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in processors:
            scores = processor(input_ids, scores)
        return scores

    return process


def product_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, weight)`` computes in where it is called: autocast's on ``x``'s device,
    else the two inputs' common dtype. Autograd functions that run a layer's products themselves
    (and again in backward, where autocast is off) cast to it explicitly."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.promote_types(x.dtype,
                                                                                                         weight.dtype)
