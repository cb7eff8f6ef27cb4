"""Token log-probabilities, the clipped GRPO surrogate, KL estimators and loss aggregation.

For completion i and token t, with ratio rho = pi_theta / pi_old and advantage A_i:

    loss_{i,t} = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_{i,t}

KL_{i,t} defaults to the k3 estimator pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (GRPO paper,
eq. 4). Per-token losses become one number through *token weights* computed once for the whole
batch (see :func:`token_weights`), so splitting the batch into micro-batches changes memory use,
never the loss or its gradient.

Where this departs from the paper: log-probabilities divide the logits by the sampling
temperature (the gradient is then that of the distribution the completions were drawn from),
and the ``dr_grpo``/``dapo`` aggregations are offered besides the paper's per-sequence mean.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
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


def completion_logprobs(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float = 1.0,
    share_prompts: bool = True,
    lean: bool = True,
) -> torch.Tensor:
    """log pi(token | prefix) for every completion token, ``(N, Tc)``.

    Position ids follow the attention mask (left padding does not shift positions), matching
    what ``generate`` used. The LM head runs only on the positions that predict completion
    tokens when the model supports ``logits_to_keep``.

    With ``share_prompts`` (and a model that takes a KV cache: a plain transformers model, or
    one under DistributedDataParallel; not a DeepSpeed engine, and a plain full-attention
    cache), rows that repeat the previous row's prompt, the ``k`` completions of a GRPO group,
    run that prompt once: one forward pass over the distinct prompts fills a KV
    cache, the cache is gathered out to every row, and a second pass runs the completion tokens
    on top of it. Attention is causal, so a prompt's keys and values do not depend on the
    completion that follows; the result and its gradient (which flows back through the
    gathered cache into the prompt pass) are those of the plain pass, with the prompt's share
    of the work divided by the group size. ``tests/test_shared_prompts.py`` pins both paths
    together. Under DDP the prompt pass calls the wrapped module and the completion pass the
    wrapper: autograd sums each parameter's gradient over both passes before DDP's per-parameter
    hook fires, so the all-reduce sees one complete gradient, as with one forward pass.

    With ``lean`` and an eligible plain model (see :mod:`zenalign.fastpath`), the same pass,
    prompts and completions together, runs on the lean forward.
    """
    if lean and sequences.shape[1] > prompt_length + 1:
        from zenalign.fastpath import checked_lean_model

        leaders, owner = prompt_groups(sequences, attention_mask, prompt_length)
        # checked on distinct prompts: the rows of a group would repeat one
        fast = checked_lean_model(model, sequences[leaders, :prompt_length], attention_mask[leaders, :prompt_length])
        if fast is not None:
            if not share_prompts:
                leaders = owner = torch.arange(sequences.shape[0], device=sequences.device)
            logits = fast.group_logits(sequences, attention_mask, prompt_length, leaders, owner)
            return _token_logprobs(logits, sequences[:, prompt_length:], temperature)
    if share_prompts and sequences.shape[0] > 1 and sequences.shape[1] > prompt_length + 1:
        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        cache_name = cache_argument(type(inner))
        if cache_name is not None and accepts_logits_to_keep(type(inner)):
            cache = new_cache(inner)
            leaders, owner = prompt_groups(sequences, attention_mask, prompt_length)
            if len(leaders) < sequences.shape[0] and full_attention_only(cache):
                logits = _shared_prompt_logits(model, inner, cache_name, cache, sequences, attention_mask,
                                               prompt_length, leaders, owner)
                return _token_logprobs(logits, sequences[:, prompt_length:], temperature)
    completion_length = sequences.shape[1] - prompt_length
    position_ids = mask_positions(attention_mask)
    kwargs = {}
    if accepts_logits_to_keep(type(getattr(model, "module", model))):  # DDP and DeepSpeed wrap the model
        kwargs["logits_to_keep"] = completion_length + 1
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    ).logits
    logits = logits[:, -(completion_length + 1) : -1, :]  # (N, Tc, V): predicts each completion token
    return _token_logprobs(logits, sequences[:, prompt_length:], temperature)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax's fused kernels: forward and backward a third of logsumexp's written-out ops
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _shared_prompt_logits(model, inner, cache_name, cache, sequences, attention_mask, prompt_length, leaders, owner):
    """The ``(N, Tc, V)`` logits predicting each completion token, with each distinct prompt run
    once into ``cache`` (see :func:`completion_logprobs`) through ``inner`` (the model, or the
    module a DDP wrapper holds) and the completions through ``model``."""
    prompt_mask = attention_mask[leaders, :prompt_length]
    first = inner(input_ids=sequences[leaders, :prompt_length], attention_mask=prompt_mask,
                  position_ids=mask_positions(prompt_mask), use_cache=True, logits_to_keep=1,
                  **{cache_name: cache}).logits
    cache.batch_select_indices(owner)  # out-of-place indexing: gradients flow back to the prompt pass
    # The last completion token is never an input whose output is needed, so it is left out.
    mask = attention_mask[:, :-1]
    rest = model(input_ids=sequences[:, prompt_length:-1], attention_mask=mask,
                 position_ids=mask_positions(mask)[:, prompt_length:], use_cache=True, logits_to_keep=0,
                 **{cache_name: cache}).logits
    return torch.cat([first[owner], rest], dim=1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate from the sampled token's log-probs.

    With x = log pi_ref - log pi_theta: k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1.
    """
    x = ref_logp - logp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return torch.exp(x) - x - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


@dataclass
class TokenLoss:
    """Per-token loss and the per-token quantities that metrics are made of, all ``(N, Tc)``."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor  # 1.0 where clipping removed the gradient
    kl: Optional[torch.Tensor]


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> TokenLoss:
    """The clipped surrogate plus the KL penalty, per token (before aggregation)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # (N, 1): one advantage per completion
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    is_clipped = ((ratio < 1.0 - clip_low) & (adv < 0)) | ((ratio > 1.0 + clip_high) & (adv > 0))
    kl = None
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        if kl_coef:
            loss = loss + kl_coef * kl
    return TokenLoss(loss=loss, ratio=ratio, clipped=is_clipped.to(logp.dtype), kl=kl)


def token_weights(
    mask: torch.Tensor,
    aggregation: str,
    max_new_tokens: int,
    num_sequences: Optional[int] = None,
    num_tokens: Optional[float] = None,
) -> torch.Tensor:
    """Weights w such that the batch loss is ``sum(w * per_token_loss)``, ``(N, Tc)``.

    - grpo:    w = 1 / (|o_i| * B)          mean over tokens, then over completions
    - dapo:    w = 1 / sum_i |o_i|          one mean over all tokens of the batch
    - dr_grpo: w = 1 / (B * max_new_tokens) a constant, so no length bias

    ``num_sequences`` (B) and ``num_tokens`` default to this batch's rows and tokens; pass the
    global counts when rows are spread over several processes.
    """
    mask = mask.to(torch.float32)
    rows = num_sequences if num_sequences is not None else mask.shape[0]
    tokens = float(num_tokens) if num_tokens is not None else float(mask.sum())
    if aggregation == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0) / rows
    if aggregation == "dapo":
        return mask / max(tokens, 1.0)
    if aggregation == "dr_grpo":
        return mask / float(rows * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use grpo, dapo or dr_grpo")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over the tokens where ``mask`` is 1 (0.0 if there are none)."""
    mask = mask.to(values.dtype)
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0
