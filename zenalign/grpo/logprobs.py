"""Token log-probabilities of sampled completions under a model: the update's, the old policy's and
the reference's passes.

Log-probabilities divide the logits by the sampling temperature, so the gradient is that of the
distribution the completions were drawn from (a departure from the paper, which samples at T = 1).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from zenalign.models.lean import checked_lean_model
from zenalign.models.lora import forward_module
from zenalign.models.primitives import (accepts_logits_to_keep, cache_argument, full_attention_only, mask_positions,
                                        new_cache, prompt_groups)


def completion_logprobs(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float = 1.0,
    share_prompts: bool = True,
    lean: bool = True,
    entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(token | prefix) for every completion token, ``(N, Tc)``; with ``entropy``, also pi's
    entropy there, ``(N, Tc)``, detached, from the same logits (see :func:`token_entropy`).

    Position ids follow the attention mask (left padding does not shift positions), matching
    what ``generate`` used. The LM head runs only on the positions that predict completion
    tokens when the model supports ``logits_to_keep``.

    With ``share_prompts`` (and a model that takes a KV cache: a plain transformers model, or
    one under DistributedDataParallel; not a DeepSpeed engine, and a plain full-attention
    cache), rows that repeat the previous row's prompt (a GRPO group) run that prompt once: one
    pass over the distinct prompts fills a KV cache, gathered out to every row, and a second pass
    runs the completion tokens on top of it. Attention is causal, so a prompt's keys and values do not depend on the
    completion that follows; the result and its gradient (which flows back through the
    gathered cache into the prompt pass) are those of the plain pass, with the prompt's share
    of the work divided by the group size (``tests/test_shared_prompts.py`` pins both paths
    together). Under DDP the prompt pass calls the wrapped module and the completion pass the
    wrapper; autograd sums each parameter's gradient over both before DDP's hook fires.

    With ``lean`` and an eligible plain model (see :mod:`zenalign.models.lean`), the same pass,
    prompts and completions together, runs on the lean forward.
    """
    if lean and sequences.shape[1] > prompt_length + 1:
        leaders, owner = prompt_groups(sequences, attention_mask, prompt_length)
        # checked on distinct prompts: the rows of a group would repeat one
        fast = checked_lean_model(model, sequences[leaders, :prompt_length], attention_mask[leaders, :prompt_length])
        if fast is not None:
            if not share_prompts:
                leaders = owner = torch.arange(sequences.shape[0], device=sequences.device)
            return chunked_token_logprobs(fast.group_hidden(sequences, attention_mask, prompt_length, leaders, owner),
                                          fast.head, sequences[:, prompt_length:], temperature, entropy, fast.vocab)
    if share_prompts and sequences.shape[0] > 1 and sequences.shape[1] > prompt_length + 1:
        inner = forward_module(model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model)
        cache_name = cache_argument(type(inner))
        if cache_name is not None and accepts_logits_to_keep(type(inner)) and not _drops_cache(inner):
            cache = new_cache(inner)
            leaders, owner = prompt_groups(sequences, attention_mask, prompt_length)
            if len(leaders) < sequences.shape[0] and full_attention_only(cache):
                logits = _shared_prompt_logits(model, inner, cache_name, cache, sequences, attention_mask,
                                               prompt_length, leaders, owner)
                return _token_logprobs(logits, sequences[:, prompt_length:], temperature, entropy)
    completion_length = sequences.shape[1] - prompt_length
    position_ids = mask_positions(attention_mask)
    kwargs = {}
    if accepts_logits_to_keep(type(forward_module(getattr(model, "module", model)))):  # DDP, DeepSpeed, peft wrap it
        kwargs["logits_to_keep"] = completion_length + 1
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    ).logits
    logits = logits[:, -(completion_length + 1) : -1, :]  # (N, Tc, V): predicts each completion token
    return _token_logprobs(logits, sequences[:, prompt_length:], temperature, entropy)


LOGIT_CHUNK = 1 << 26  # logits computed at once by chunked_token_logprobs: 256 MB in fp32


def chunked_token_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                           temperature: float, entropy: bool, vocab: int, budget: int | None = None):
    """:func:`_token_logprobs` of ``head(hidden)`` (``(N, Tc, H)`` -> ``(N, Tc, V)`` logits), a chunk
    of positions at a time so that at most about ``budget`` logits exist at once. With a gradient,
    each chunk runs under non-reentrant checkpointing: backward recomputes the chunk's logits from
    its hidden states instead of keeping every chunk's, so memory grows with the chunk, not with
    Tc x V (at V = 151,936 and 512 positions, the full fp32 logits of 32 rows are 10 GB). Below the
    budget it is one plain pass, exactly :func:`_token_logprobs`."""
    n, tc = targets.shape
    step = max(1, (budget or LOGIT_CHUNK) // max(1, n * vocab))
    if step >= tc:
        return _token_logprobs(head(hidden), targets, temperature, entropy)

    def chunk(h: torch.Tensor, t: torch.Tensor):
        return _token_logprobs(head(h), t, temperature, entropy)

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    parts = [checkpoint(chunk, hidden[:, i:i + step], targets[:, i:i + step], use_reentrant=False) if recompute
             else chunk(hidden[:, i:i + step], targets[:, i:i + step]) for i in range(0, tc, step)]
    if not entropy:
        return torch.cat(parts, dim=1)
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool = False):
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax's fused kernels rather than a gather minus a written-out logsumexp: fewer kernels
    # forward and backward (measurements: docs/performance.md)
    log_probs = torch.log_softmax(logits, dim=-1)                                  # (N, Tc, V)
    chosen = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)               # (N, Tc)
    return (chosen, token_entropy(log_probs)) if entropy else chosen


@torch.no_grad()
def token_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """``H = -sum_v p_v log p_v`` at every position of ``(N, Tc, V)`` log-probabilities, ``(N, Tc)``,
    without gradient. One row at a time, so the extra memory is one row's ``(Tc, V)``, not the
    batch's (at V = 152k and 4096 tokens a row is 2.5 GB in fp32, the batch many times that)."""
    out = torch.empty(log_probs.shape[:-1], dtype=log_probs.dtype, device=log_probs.device)
    for i in range(log_probs.shape[0]):
        row = log_probs[i]                                                         # (Tc, V)
        out[i] = -torch.linalg.vecdot(row.exp(), row)  # fused multiply-sum: a quarter faster than (p * lp).sum()
        if bool(out[i].isnan().any()):  # a -inf log-prob: 0 * log 0 = 0
            out[i] = -(row.exp() * row).nan_to_num_(0.0).sum(-1)
    return out


def _drops_cache(model: torch.nn.Module) -> bool:
    """transformers turns the KV cache off under gradient checkpointing in training: a prompt pass
    would then fill no cache, and the completions would lose their prompts."""
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return model.training and bool(getattr(model, flag, False))


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
