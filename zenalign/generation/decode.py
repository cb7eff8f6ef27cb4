"""The token loop every decoder shares (zenalign's own over transformers' forward, and the lean
forward's): pick each row's next token through the logits processors, pad the rows that have
ended, stop when all have."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ChoosesTokens(Protocol):
    """A logits processor that picks the next tokens itself (the Gumbel sampler): last in the list
    the token loop is given, its ``choose`` replaces the argmax."""

    def choose(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor: ...


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
    of those extra steps are padding in every row, which :func:`zenalign.generation.rollout.rollout_from`
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
