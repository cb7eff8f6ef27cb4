"""What every model path shares: what a transformers forward accepts, KV caches, position ids
that follow an attention mask, the prompt groups of a GRPO batch, and the dtype of a layer's
products. Nothing here knows GRPO; the lean forward (:mod:`zenalign.models.lean`), the decoders
(:mod:`zenalign.generation`) and the log-prob passes all build on it."""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Optional

import torch


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


def product_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, weight)`` computes in where it is called: autocast's on ``x``'s device,
    else the two inputs' common dtype. Autograd functions that run a layer's products themselves
    (and again in backward, where autocast is off) cast to it explicitly."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.promote_types(x.dtype,
                                                                                                         weight.dtype)
