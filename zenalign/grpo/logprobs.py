"""Token log-probabilities of sampled completions under a model: the update's, the old policy's and
the reference's passes.

Log-probabilities divide the logits by the sampling temperature, so the gradient is that of the
distribution the completions were drawn from (a departure from the paper, which samples at T = 1).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from zenalign.models.lean import checked_lean_model, lean_model
from zenalign.models.lora import forward_module
from zenalign.models.primitives import (accepts_logits_to_keep, cache_argument, full_attention_only, mask_positions,
                                        new_cache, product_dtype, prompt_groups)


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
    tokens when the model supports ``logits_to_keep``, and no pass holds the batch's full
    ``(N, Tc, V)`` logits: the lean forward hands its last hidden states to
    :func:`chunked_token_logprobs`, and transformers' forward does too where its head is a plain
    linear layer (:class:`_HeadInputs`; models that change their logits after the head, and LM
    heads partitioned by ZeRO-3, compute the full logits).

    With ``share_prompts`` (and a model that takes a KV cache: a plain transformers model, or
    one under DistributedDataParallel; not a DeepSpeed engine, and a plain full-attention
    cache), rows that repeat the previous row's prompt (a GRPO group) run that prompt once: one
    pass over the distinct prompts fills a KV cache, gathered out to every row, and a second pass
    runs the completion tokens on top of it. Attention is causal, so a prompt's keys and values do not depend on the
    completion that follows; the result and its gradient (which flows back through the
    gathered cache into the prompt pass) are those of the plain pass, with the prompt's share
    of the work divided by the group size (``tests/models/test_shared_prompts.py`` pins both paths
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
            hidden = fast.final_norm(fast.group_hidden(sequences, attention_mask, prompt_length, leaders, owner))
            return chunked_token_logprobs(hidden, fast.model.lm_head, sequences[:, prompt_length:], temperature,
                                          entropy, fast.vocab)
    targets = sequences[:, prompt_length:]
    transformers_model = forward_module(getattr(model, "module", model))  # DDP, DeepSpeed, peft wrap it
    run, hidden_of, select = _transformers_pass(model, sequences, attention_mask, prompt_length, share_prompts)
    head = _capturable_head(transformers_model)
    if head is not None:
        with _HeadInputs(head) as captured:
            logits = run()
        if captured.faithful(transformers_model, logits):
            return chunked_token_logprobs(hidden_of(captured.inputs), head, targets, temperature, entropy,
                                          head.out_features)
    return _token_logprobs(select(run()), targets, temperature, entropy)


def _transformers_pass(model, sequences, attention_mask, prompt_length, share_prompts):
    """How transformers' forward computes the batch's log-prob logits: ``run()`` gives the model's
    logits; ``select`` picks the ``(N, Tc, V)`` that predict the completion tokens from them, and
    ``hidden_of`` the matching ``(N, Tc, H)`` head inputs from those a :class:`_HeadInputs`
    recorded during ``run()``. Shared prompts where the model allows (see
    :func:`completion_logprobs`), else one plain pass."""
    completion_length = sequences.shape[1] - prompt_length
    if share_prompts and sequences.shape[0] > 1 and completion_length > 1 and _can_share_prompts(model):
        inner = _cache_module(model)
        cache_name = cache_argument(type(inner))
        leaders, owner = prompt_groups(sequences, attention_mask, prompt_length)
        if len(leaders) < sequences.shape[0]:
            def run_shared():
                return _shared_prompt_logits(model, inner, cache_name, new_cache(inner), sequences, attention_mask,
                                             prompt_length, leaders, owner)

            def shared_hidden(inputs):  # each prompt pass's last state, to its rows; then the completions'
                return torch.cat([inputs[0][:, -1:][owner], inputs[1]], dim=1)

            return run_shared, shared_hidden, lambda logits: logits
    kwargs = {"logits_to_keep": completion_length + 1} if accepts_logits_to_keep(
        type(forward_module(getattr(model, "module", model)))) else {}

    def run():
        return model(input_ids=sequences, attention_mask=attention_mask, position_ids=mask_positions(attention_mask),
                     use_cache=False, **kwargs).logits

    def hidden(inputs):
        return inputs[0][:, -(completion_length + 1) : -1]

    return run, hidden, lambda logits: logits[:, -(completion_length + 1) : -1, :]


# Models found (by _HeadInputs.faithful) to change their logits after the LM head, for as long as they
# live: kept beside the model rather than as a flag on it.
LOGITS_AFTER_HEAD: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _capturable_head(model: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The model's LM head where :class:`_HeadInputs` may take its place: a plain ``nn.Linear``
    whose weight is whole on this process (not partitioned by ZeRO-3), on a model not found
    (by an earlier :meth:`_HeadInputs.faithful`) to change its logits after the head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear or hasattr(head.weight, "ds_id") or model in LOGITS_AFTER_HEAD:
        return None
    return head


class _HeadInputs:
    """Within it, ``head`` (a transformers model's LM head) records what the model feeds it and
    runs on the last position only, so the model's forward computes no full (N, T, V) logits;
    the log-probs are then computed from the recorded hidden states by
    :func:`chunked_token_logprobs`, a chunk at a time. Autograd runs through the recorded states as
    through the model's own (they are the head's input), under DDP and DeepSpeed ZeRO-1/2 too.
    With ``head`` None it does nothing."""

    def __init__(self, head: Optional[torch.nn.Linear]):
        self.head, self.inputs, self.handle = head, [], None

    def __enter__(self) -> "_HeadInputs":
        if self.head is not None:
            self.handle = self.head.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()

    def _record(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("input")
        if hidden is None or hidden.dim() != 3:
            return None
        self.inputs.append(hidden)
        return ((hidden[:, -1:],) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": hidden[:, -1:]})

    def faithful(self, model: torch.nn.Module, logits: torch.Tensor) -> bool:
        """Whether the model's logits (last position) are the head's output on the last recorded
        state. A model that rescales or soft-caps its logits after the head (Gemma 2, Cohere,
        Granite) is not: it is remembered and runs the plain pass from then on."""
        if self.head is None or not self.inputs:
            return False
        with torch.no_grad():
            expected = self.head(self.inputs[-1][:, -1:].detach())[:, -1].float()
        same = logits.shape[-1] == expected.shape[-1] and torch.allclose(logits[:, -1].detach().float(), expected,
                                                                          rtol=1e-3, atol=1e-3)
        if not same:
            LOGITS_AFTER_HEAD.add(model)
        return same


LOGIT_CHUNK = 1 << 24  # logits computed at once by chunked_token_logprobs: 64 MB in fp32
SOFTMAX_BLOCK = 1 << 20  # of a chunk's logits, log-softmaxed at once into a second buffer: 4 MB in fp32


def chunked_token_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, temperature: float,
                           entropy: bool, vocab: int, budget: int | None = None):
    """:func:`_token_logprobs` of ``head(hidden)`` (``(N, Tc, H)`` -> ``(N, Tc, V)`` logits), a chunk
    of (row, position) pairs at a time so that at most about ``budget`` logits exist at once, and
    none are kept for backward: memory grows with the chunk, not with Tc x V (at V = 151,936 and
    512 positions, the full fp32 logits of 32 rows are 10 GB). One :class:`_LinearLogProbs` runs
    every chunk; its backward recomputes each chunk's logits from the hidden states and writes the
    softmax gradient in place."""
    rows = max(1, (budget or LOGIT_CHUNK) // max(1, vocab))
    return _LinearLogProbs.apply(hidden, head.weight, head.bias, targets, temperature, entropy, rows)


class _LinearLogProbs(torch.autograd.Function):
    """``log softmax(h W^T + b) / T`` at each position's target ``(n, t)`` (and, with ``entropy``,
    the distribution's entropy, without gradient), for hidden states ``h`` ``(n, t, H)``, ``rows``
    of the ``n t`` positions at a time.

    It saves ``h`` and each position's log-normaliser ``lse`` only. Backward recomputes the
    logits ``z`` and turns them into their own gradient in place: with ``g`` the incoming
    gradient and ``y`` the target, ``d logp_y / d z_v = ([v = y] - softmax(z)_v) / T``, so the
    gradient of ``z`` is ``-g * exp(z - lse)``, plus ``g`` at ``y``, over ``T``. Autograd through
    ``log_softmax`` and ``gather`` instead keeps the (n, t, V) log-softmax and in backward fills
    a zero tensor of that size, scatters into it and runs log_softmax's backward over it: two
    more full passes over the logits and two more tensors of their size (measurements:
    docs/performance-notes.md). Under autocast the products run in autocast's dtype, as ``F.linear``
    would, and the softmax in float32.

    Every chunk's logits go into one buffer, their log-softmax a few rows (``SOFTMAX_BLOCK``
    values) at a time into a small second one, and the weight's gradient is summed into one tensor:
    chunk by chunk they would be fresh allocations of tens of megabytes each (a (V, H) weight
    gradient per chunk, summed by autograd), which glibc maps and unmaps every time, so that
    every page is faulted in and zeroed again (measurements: docs/performance-notes.md)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, entropy: bool, rows: int):
        dtype = product_dtype(hidden, weight)
        h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1, 1)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)              # cast once, not per chunk
        chosen, lse = (torch.empty(y.shape[0], dtype=torch.float32, device=h.device) for _ in range(2))
        ent = torch.empty_like(chosen) if entropy else None
        logits = log_probs = None
        block = max(1, SOFTMAX_BLOCK // w.shape[0])
        for start in range(0, y.shape[0], rows):
            logits = _logits_into(logits, h[start:start + rows], w, b, temperature)    # (r, V) float32
            for first in range(start, start + logits.shape[0], block):  # log-softmax a few rows at a time
                z = logits[first - start:first - start + block]
                part = slice(first, first + z.shape[0])
                log_probs = torch.ops.aten._log_softmax.out(z, -1, False, out=_buffer(log_probs, *z.shape, z.device))
                chosen[part] = log_probs.gather(-1, y[part]).squeeze(-1)
                lse[part] = z.gather(-1, y[part]).squeeze(-1).sub_(chosen[part])          # z_y - logp_y
                if entropy:
                    ent[part] = _entropy(log_probs, scratch=z)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.dtype, ctx.rows = temperature, dtype, rows
        if ent is None:
            return chosen.view(targets.shape)
        ent = ent.view(targets.shape)
        ctx.mark_non_differentiable(ent)  # the tensor returned, not a view of it
        return chosen.view(targets.shape), ent

    @staticmethod
    def backward(ctx, grad, *_):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, temperature, rows = ctx.dtype, ctx.temperature, ctx.rows
        h, y, g = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1, 1), grad.reshape(-1, 1).float()
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty(h.shape, dtype=hidden.dtype, device=h.device) if want_h else None
        grad_weight = torch.empty_like(weight) if want_w else None  # the first chunk writes it
        grad_bias = torch.zeros_like(bias) if bias is not None and want_b else None
        logits = None
        for start in range(0, h.shape[0], rows):
            part = slice(start, start + rows)
            logits = _logits_into(logits, h[part], w, b, temperature).sub_(lse[part, None]).exp_()   # softmax
            logits.mul_(g[part].neg()).scatter_add_(-1, y[part], g[part])
            if temperature != 1.0:
                logits.div_(temperature)
            grad_logits = logits.to(dtype)                                                  # (r, V)
            if want_h:
                _product_into(grad_hidden[part], grad_logits, w)
            if want_w:  # summed in the weight's dtype, chunk by chunk, as autograd would sum per-chunk gradients
                _product_into(grad_weight, grad_logits.t(), h[part].to(dtype), accumulate=start > 0)
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0))
        grad_hidden = grad_hidden.view(hidden.shape) if want_h else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _buffer(buffer: Optional[torch.Tensor], rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """The first ``rows`` rows of ``buffer``, a float32 ``(rows, columns)`` tensor made on first use."""
    if buffer is not None and buffer.shape[0] >= rows:
        return buffer[:rows]
    return torch.empty(rows, columns, dtype=torch.float32, device=device)


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """``out = a @ b``, or ``out += a @ b``, written in place (``out`` may be of a wider dtype than
    the product, which is then cast, or summed, into it)."""
    if out.dtype != a.dtype:
        product = a @ b
        out.add_(product) if accumulate else out.copy_(product)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _logits_into(buffer: Optional[torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 temperature: float) -> torch.Tensor:
    """float32 logits ``(hidden @ weight.T + bias) / temperature`` of ``(r, H)`` hidden states, in
    ``buffer``'s first ``r`` rows (``buffer`` made on first use). The product runs in ``weight``'s
    dtype (autocast's, cast by the caller)."""
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.to(weight.dtype)
        out = _buffer(buffer, h.shape[0], weight.shape[0], h.device)
        if weight.dtype != torch.float32:
            out.copy_(F.linear(h, weight, bias))
        elif bias is None:
            torch.mm(h, weight.t(), out=out)
        else:
            torch.addmm(bias, h, weight.t(), out=out)
    return out.div_(temperature) if temperature != 1.0 else out


def _entropy(log_probs: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``-sum_v p_v log p_v`` of each row of ``(r, V)`` log-probabilities, the probabilities written
    into ``scratch`` (same shape)."""
    probs = torch.exp(log_probs, out=scratch)
    out = -torch.linalg.vecdot(probs, log_probs)  # fused multiply-sum: a quarter faster than (p * lp).sum()
    bad = out.isnan()
    if bool(bad.any()):  # a -inf log-prob: 0 * log 0 = 0
        out[bad] = -(probs[bad] * log_probs[bad]).nan_to_num_(0.0).sum(-1)
    return out


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool = False):
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax's fused kernels rather than a gather minus a written-out logsumexp: fewer kernels
    # forward and backward (measurements: docs/performance-notes.md)
    log_probs = torch.log_softmax(logits, dim=-1)                                  # (N, Tc, V)
    chosen = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)               # (N, Tc)
    return (chosen, token_entropy(log_probs)) if entropy else chosen


@torch.no_grad()
def token_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """``H = -sum_v p_v log p_v`` at every position of ``(N, Tc, V)`` log-probabilities, ``(N, Tc)``,
    without gradient. One row at a time, so the extra memory is one row's ``(Tc, V)``, not the
    batch's (at V = 152k and 4096 tokens a row is 2.5 GB in fp32, the batch many times that)."""
    out = torch.empty(log_probs.shape[:-1], dtype=log_probs.dtype, device=log_probs.device)
    scratch = torch.empty_like(log_probs[0]) if log_probs.shape[0] else None                 # (Tc, V), reused
    for i in range(log_probs.shape[0]):
        out[i] = _entropy(log_probs[i], scratch)
    return out


def update_pass_kind(model: torch.nn.Module, lean: bool, share_prompts: bool) -> tuple[bool, bool]:
    """``(lean, share_prompts)`` as :func:`completion_logprobs` runs ``model`` (the update's: plain,
    peft, DDP or DeepSpeed) in training mode given these two flags: on the lean forward or not,
    each group's prompt once or not. The other passes of an update (the reference's, pi_old's)
    given the same two flags run the update's products in its order, so that on equal weights
    their log-probs equal the update's to the bit (and the KL term and its gradient are exactly
    0). With their own flags they would not always: a plain reference takes the lean forward
    where the update's model under DDP or DeepSpeed cannot, and shares its prompts where the
    update's pass does not (transformers' forward under gradient checkpointing in training mode,
    a DeepSpeed engine): the same sums in another order."""
    lean = lean and lean_model(model) is not None
    return lean, share_prompts and (lean or _can_share_prompts(model, training=True))


def _cache_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward fills a shared prompt pass's KV cache: the model, or the one DDP wraps."""
    return forward_module(model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model)


def _can_share_prompts(model: torch.nn.Module, training: Optional[bool] = None) -> bool:
    """Whether transformers' forward of ``model`` can run a batch's prompts once into a KV cache:
    a model that takes one and ``logits_to_keep`` (a plain transformers model, or one under DDP;
    not a DeepSpeed engine), a plain full-attention cache, which it does not drop (see
    :func:`_drops_cache`; ``training``: in that mode, by default the model's own)."""
    inner = _cache_module(model)
    return (cache_argument(type(inner)) is not None and accepts_logits_to_keep(type(inner))
            and not _drops_cache(inner, training) and full_attention_only(new_cache(inner)))


def _drops_cache(model: torch.nn.Module, training: Optional[bool] = None) -> bool:
    """transformers turns the KV cache off under gradient checkpointing in training: a prompt pass
    would then fill no cache, and the completions would lose their prompts. ``training``: whether
    in training mode (by default the model's own mode)."""
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return (model.training if training is None else training) and bool(getattr(model, flag, False))


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
