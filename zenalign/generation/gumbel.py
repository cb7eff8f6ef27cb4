"""Batch-invariant sampling with the Gumbel-max trick.

    argmax_v (logits_v / T + G_v),  G_v = -log(-log U_v),  U_v ~ Uniform(0, 1)

is an exact sample from softmax(logits / T). zenalign draws U from a counter-based hash of
(seed, step, completion id, position, token id) instead of a stateful generator, so a completion
depends only on *which* completion it is, never on which process generated it, how the batch was
padded, or what was sampled before. Consequences:

- a run on 2 processes samples the same completions as on 1 (up to floating-point ties);
- a resumed run samples exactly what the uninterrupted run would have;
- micro-batching and batch sizes can change without changing the samples.

Top-k and top-p are applied (with transformers' own warpers) before the noise is added.

Over a large vocabulary, hashing and perturbing every token dominates a decoding step (at
V = 151,936 and 32 rows, 420 ms a token against 60 ms for the LM head's product; the 64-bit
multiplies of the hash have no vector instruction on most CPUs). So above ``FULL_VOCAB`` tokens
only the ``CANDIDATES`` highest-scoring tokens get their own noise, and the rest, the tail, are
one atom: the largest perturbed score among them is itself Gumbel-distributed around their
log-sum-exp, ``max_{v in tail}(s_v + G_v) ~ LSE_tail + G``, so one keyed draw stands for it. If
the atom wins, the token is drawn from the tail's own softmax by inverse CDF with another keyed
uniform. The result is still an exact sample from softmax(logits / T) and still a function of
(key, position) and the row's logits alone; at or below ``FULL_VOCAB`` every token gets its own
noise, as before. The candidates' noise is the same hash as the full draw's.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

_MASK64 = (1 << 64) - 1
ROW_BLOCK = 64  # positions whose row hashes a sampler computes at once
FULL_VOCAB = 4096  # up to this many tokens, every token gets its own noise
CANDIDATES = 64  # above it, the tokens that do; the rest share one draw
TAIL_BLOCK = 1024  # ids per block of the tail's sums


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 torch stores (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def token_hashes(vocab_size: int, device=None) -> torch.Tensor:
    """``splitmix64(token id)`` for every id, ``(1, V)``: the part of :func:`uniform` that depends
    on the token alone, which a sampler computes once instead of once per step."""
    return splitmix64(torch.arange(vocab_size, device=device, dtype=torch.int64).unsqueeze(0))


def uniform(keys: torch.Tensor, position: int, vocab_size: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """U in (0, 1), shape ``(N, V)``, a pure function of (key, position, token id). ``tokens`` is
    :func:`token_hashes` for this vocabulary and device, if the caller keeps it."""
    tokens = token_hashes(vocab_size, keys.device) if tokens is None else tokens
    return _uniform(row_hashes(keys, position, position + 1), tokens)


def row_hashes(keys: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """The part of :func:`uniform` that depends on (key, position) alone, ``(N, end - first)``
    for positions ``first, ..., end - 1``: a sampler computes a run of positions at once."""
    positions = torch.arange(first, end, device=keys.device, dtype=torch.int64)
    return splitmix64(keys.to(torch.int64)[:, None] * 1_000_003 + positions)


def _uniform(row: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """U from one position's ``(N, 1)`` row hashes and the ``(1, V)`` token hashes."""
    bits = _splitmix64_inplace(row ^ tokens)
    mantissa = _shr(bits, 11).to(torch.float64)  # 53 random bits
    return mantissa.add_(0.5).div_(float(1 << 53))


def _splitmix64_inplace(x: torch.Tensor) -> torch.Tensor:
    """:func:`splitmix64` overwriting ``x`` (a fresh tensor the caller owns): the same bits with
    no new tensor per operation, for the ``(N, V)`` hash a sampler computes every step."""
    x.add_(_GOLDEN)
    x.bitwise_xor_(_shr(x, 30)).mul_(_MIX1)
    x.bitwise_xor_(_shr(x, 27)).mul_(_MIX2)
    return x.bitwise_xor_(_shr(x, 31))


def completion_keys(seed: int, step: int, first_completion: int, count: int, device=None) -> torch.Tensor:
    """One key per completion: ``first_completion + i`` is the completion's index in the global batch."""
    base = splitmix64(torch.tensor([seed * 7_919 + step], dtype=torch.int64))
    ids = torch.arange(first_completion, first_completion + count, dtype=torch.int64)
    return splitmix64(base ^ splitmix64(ids)).to(device)


class GumbelSampler:
    """A logits processor that turns greedy decoding into sampling from softmax(logits / T),
    with top-k/top-p truncation, driven by per-completion keys (see module docstring)."""

    def __init__(self, keys: torch.Tensor, prompt_length: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 candidates: int = CANDIDATES, full_vocab: int = FULL_VOCAB):
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        self.keys = keys
        self.candidates, self.full_vocab = candidates, full_vocab
        self.prompt_length = prompt_length
        self.temperature = temperature
        self.warpers: Sequence = []
        self._tokens: torch.Tensor | None = None  # token_hashes, once per vocabulary and device
        self._rows: torch.Tensor | None = None  # row_hashes for positions 0 .. ROW_BLOCK * n - 1
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Scores whose argmax is the sampled token (the logits-processor interface): ``scores + G``
        over a vocabulary of at most ``FULL_VOCAB`` tokens; over a larger one, 0 at the sampled
        token and -inf elsewhere."""
        scores, rows = self._prepared(input_ids, scores)
        if scores.shape[-1] <= max(self.full_vocab, self.candidates):
            return self._perturbed(scores, rows)
        return _one_hot_scores(scores, _candidates_and_tail(scores, rows, self._tokens, self.candidates))

    def choose(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The sampled ids ``(N,)``: the argmax of :meth:`__call__`'s scores, without building
        them over a large vocabulary (a decoding loop that knows this sampler calls this)."""
        scores, rows = self._prepared(input_ids, scores)
        if scores.shape[-1] <= max(self.full_vocab, self.candidates):
            return self._perturbed(scores, rows).argmax(dim=-1)
        return _candidates_and_tail(scores, rows, self._tokens, self.candidates)

    def choose_at(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`choose` with each row at a position of its own, ``positions`` ``(N,)``: for episodes,
        whose rows wait for their tools or stop for the others, a token's noise is keyed by how many
        tokens its row has sampled, not by a column of the batch."""
        scores = self._tempered(None, scores)
        self._hash_tokens(scores)
        rows = splitmix64(self.keys.to(scores.device, torch.int64)[:, None] * 1_000_003 + positions[:, None])
        if scores.shape[-1] <= max(self.full_vocab, self.candidates):
            return self._perturbed(scores, rows).argmax(dim=-1)
        return _candidates_and_tail(scores, rows, self._tokens, self.candidates)

    def _perturbed(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``scores + G`` with every id's own noise, G = -log(-log U)."""
        return scores + _gumbel(rows, self._tokens[:, : scores.shape[-1]]).to(scores.dtype)

    def _prepared(self, input_ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32, tempered, truncated scores and this position's ``(N, 1)`` row hashes."""
        scores = self._tempered(input_ids, scores)
        position = input_ids.shape[1] - self.prompt_length  # 0 for the first completion token
        device = scores.device
        self._hash_tokens(scores)
        if self._rows is None or self._rows.device != device or position >= self._rows.shape[1]:
            end = (position // ROW_BLOCK + 1) * ROW_BLOCK
            self._rows = row_hashes(self.keys.to(device), 0, end)  # generate_groups moves the keys before decoding
        return scores, self._rows[:, position : position + 1]                           # (N, 1)

    def _tempered(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        for warper in self.warpers:  # transformers' top-k and top-p warpers do not read input_ids
            scores = warper(input_ids, scores)
        return scores

    def _hash_tokens(self, scores: torch.Tensor) -> None:
        vocab, device = scores.shape[-1], scores.device
        if self._tokens is None or self._tokens.shape[-1] != vocab + 2 or self._tokens.device != device:
            self._tokens = token_hashes(vocab + 2, device)  # ids V and V + 1: the tail's two draws


def _gumbel(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """G = -log(-log U), float64, for the (row, token) hashes given."""
    return _uniform(rows, tokens).log_().neg_().log_().neg_()


def _candidates_and_tail(scores: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, m: int) -> torch.Tensor:
    """Gumbel-max over the ``m`` best tokens of each row plus the rest as one atom (see the module
    docstring); the ``(N,)`` sampled ids.

    The tail's log-sum-exp is at most ``log(V - m)`` above its best score, the ``m``-th best
    overall, so a row whose best candidate beats even that bound needs no pass over the tail; the
    others sum the tail's ``exp`` in blocks of ``TAIL_BLOCK`` ids, which also serve the rare
    inverse-CDF draw inside the tail."""
    n, vocab = scores.shape
    top, index = scores.topk(m, dim=-1)                                                   # (N, m), best first
    perturbed = top.double() + _gumbel(rows, tokens[0, index])                            # -inf stays -inf
    best, at = perturbed.max(dim=-1)
    chosen = index.gather(1, at[:, None]).squeeze(1)
    tail_noise = _gumbel(rows, tokens[:, vocab : vocab + 1]).squeeze(1)                   # (N,)
    bound = math.log(vocab - m) + top[:, -1].double() + tail_noise
    if _waits_for_device(scores):
        return _tail_in_every_row(scores, index, peak=top[:, :1], best=best, chosen=chosen, opened=bound > best,
                                  rows=rows, tokens=tokens, tail_noise=tail_noise)
    open_rows = torch.nonzero(bound > best).flatten()
    if not len(open_rows):
        return chosen
    peak = top[open_rows, :1]                                                             # (k, 1)
    if len(open_rows) == n:  # every row (flat logits): no copy of the rows first
        weights = (scores - peak).exp_().scatter_(1, index, 0.0)                          # the tail's exp(s - peak)
    else:
        weights = scores[open_rows].sub_(peak).exp_().scatter_(1, index[open_rows], 0.0)
    if vocab % TAIL_BLOCK:
        weights = F.pad(weights, (0, -vocab % TAIL_BLOCK))
    blocks = weights.view(len(open_rows), -1, TAIL_BLOCK)
    block_sums = blocks.sum(dim=-1).double()                                              # (k, V / block)
    tail_best = block_sums.sum(dim=-1).log() + peak.squeeze(1).double() + tail_noise[open_rows]
    wins = torch.nonzero(tail_best > best[open_rows]).flatten()                           # a tail token wins
    if len(wins):
        won = open_rows[wins]
        u = _uniform(rows[won], tokens[:, vocab + 1 : vocab + 2]).squeeze(1)              # (w,)
        chosen[won] = _inverse_cdf(blocks, block_sums, u, wins)
    return chosen


def _waits_for_device(scores: torch.Tensor) -> bool:
    """Whether finding the rows that need the tail would make the host wait for the device: on a
    GPU, ``nonzero`` and every shape that depends on the data are host-device syncs, once per
    token in a decode. There :func:`_tail_in_every_row` does the same work in every row instead."""
    return scores.device.type != "cpu"


def _tail_in_every_row(scores: torch.Tensor, index: torch.Tensor, *, peak: torch.Tensor, best: torch.Tensor,
                       chosen: torch.Tensor, opened: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                       tail_noise: torch.Tensor) -> torch.Tensor:
    """The tail's part of :func:`_candidates_and_tail` with no shape that depends on the data: every
    row sums its tail and draws inside it, and a row keeps its best candidate unless its tail could
    win (``opened``) and did. Each row's numbers are those the CPU path computes for it (the same
    operations, row by row), so the ids are the same; a GPU does this extra work faster than it
    would wait for the host."""
    n, vocab = scores.shape
    weights = (scores - peak).exp_().scatter_(1, index, 0.0)                              # the tail's exp(s - peak)
    if vocab % TAIL_BLOCK:
        weights = F.pad(weights, (0, -vocab % TAIL_BLOCK))
    blocks = weights.view(n, -1, TAIL_BLOCK)
    block_sums = blocks.sum(dim=-1).double()                                              # (N, V / block)
    tail_best = block_sums.sum(dim=-1).log() + peak.squeeze(1).double() + tail_noise
    wins = opened & (tail_best > best)                                                    # (N,)
    u = _uniform(rows, tokens[:, vocab + 1 : vocab + 2]).squeeze(1)                       # (N,)
    drawn = _inverse_cdf(blocks, block_sums, u, torch.arange(n, device=scores.device))
    return torch.where(wins, drawn, chosen)


def _inverse_cdf(blocks: torch.Tensor, block_sums: torch.Tensor, u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The tail id that each of ``rows`` ``(w,)`` draws with its uniform ``u`` ``(w,)`` from its
    weights in ``blocks`` ``(k, B, TAIL_BLOCK)`` (``exp(s - peak)``, 0 at the candidates and the
    padding) and their per-block sums ``(k, B)``: the block where ``u`` times the row's total
    falls, then the id inside it. Every row is found in one batch, reading one block of its
    weights, and each row's sums and searches are its own, so a row draws the same id alone as in
    any batch."""
    sums = block_sums[rows]                                                               # (w, B)
    cumulative = sums.cumsum(1)
    target = (u * cumulative[:, -1])[:, None]                                             # (w, 1)
    # u * total can round up to the total itself: then the last block with any weight
    blocks_with_weight = torch.where(sums > 0, torch.arange(sums.shape[1], device=u.device), 0)
    b = torch.minimum(torch.searchsorted(cumulative, target, right=True), blocks_with_weight.amax(1, keepdim=True))
    before = torch.where(b > 0, cumulative.gather(1, (b - 1).clamp(min=0)), 0.0)          # the blocks before b
    block = blocks[rows, b.squeeze(1)]                                                    # (w, TAIL_BLOCK)
    ids = torch.arange(block.shape[1], device=block.device)
    last = torch.where(block != 0, ids, 0).amax(1, keepdim=True)  # rounding between the two sums: never past a real token
    j = torch.minimum(torch.searchsorted(block.double().cumsum(1), target - before, right=True), last)
    return (b * TAIL_BLOCK + j).squeeze(1)


def _one_hot_scores(scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(scores, float("-inf"))
    return out.scatter_(1, chosen[:, None], 0.0)
