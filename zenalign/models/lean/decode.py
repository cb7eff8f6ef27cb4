"""Decoding on the lean forward (:class:`LeanDecoder`): each distinct prompt prefilled once, then one
token per step for all ``P * k`` rows, with a preallocated key/value cache held as plain tensors.
The token loop itself (logits processors, EOS, stopping) is the one every decoder shares,
:func:`zenalign.generation.decode.sample_loop`; this module gives it the first logits and the step."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from zenalign.models.lean.kernels import _CpuAutocastOff, _Packed, pack_for_rows
from zenalign.models.lean.model import LeanLM
from zenalign.models.primitives import mask_positions


class LeanDecoder:
    """A :class:`~zenalign.models.lean.model.LeanLM`'s decoding: the prefill, the cache and each
    step's single-query attention (:meth:`attend_one`)."""

    def __init__(self, lean: LeanLM):
        self.lean = lean
        self.heads, self.kv_heads, self.head_dim, self.scaling = lean.heads, lean.kv_heads, lean.head_dim, lean.scaling

    def rotary_table(self, x: torch.Tensor, length: int) -> Optional[torch.Tensor]:
        """:meth:`LeanLM.rotary` for every position below ``length``, for decoding to index instead of
        recomputing each token; None where the model's rotary embedding depends on the positions
        it is called with (dynamic and longrope scaling update their frequencies from them)."""
        rope_type = getattr(self.lean.body.rotary_emb, "rope_type", "default")
        if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
            return None
        return self.lean.rotary(x, torch.arange(length, device=x.device))

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Attention of one new token per row: ``(N, H, D)`` queries over ``(N, KV, S, D)`` cached
        keys/values with an additive ``(N, 1, 1, S)`` mask (0 or -inf). Query heads are grouped
        under their key/value head, so nothing is repeated. On a CPU it is written out (two
        batched products, faster than the fused kernel at one query per row). On a GPU it is the
        fused kernel with each key/value head's query heads as its queries (one query per row
        makes them a short sequence over the same keys and the same mask row), so the
        memory-efficient kernel runs on the cache as it is, in the cache's dtype."""
        n, s = q.shape[0], k.shape[2]
        if q.device.type != "cpu":
            grouped = q.to(k.dtype).reshape(n, self.kv_heads, -1, self.head_dim)             # (N, KV, H/KV, D)
            out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=bias.to(k.dtype), scale=self.scaling)
            return out.reshape(n, self.heads, self.head_dim)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else v.dtype
        with _CpuAutocastOff():  # float32 products: autocast would cast the whole cache per step
            q = q.float().view(n, self.kv_heads, -1, self.head_dim)  # (N, KV, H/KV, D)
            scores = torch.baddbmm(bias.expand(n, self.kv_heads, q.shape[2], s).reshape(-1, q.shape[2], s),
                                   q.reshape(-1, q.shape[2], self.head_dim),
                                   k.float().reshape(-1, s, self.head_dim).transpose(1, 2), alpha=self.scaling)
            out = torch.bmm(scores.softmax(dim=-1), v.float().reshape(-1, s, self.head_dim))
        return out.view(n, self.heads, self.head_dim).to(dtype)

    def grouped_caches(self, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]], group_size: int,
                       total: int) -> list[torch.Tensor]:
        """Each layer's ``(2, P*k, KV, total, D)`` key/value cache, its first ``Tp`` columns the prompts'
        ``(P, KV, Tp, D)`` keys and values repeated out to their ``group_size`` rows, the rest
        preallocated for every new token (each column is written before it is read)."""
        device, autocast = prompt_kv[0][0].device.type, torch.is_autocast_enabled(prompt_kv[0][0].device.type)
        # The cache's dtype: float32 on a CPU, where single-query attention runs in float32 (see
        # attend_one); on a GPU under autocast, autocast's dtype, which its attention kernel reads
        # (half the memory and bandwidth of float32, and no cast of the whole cache per token).
        cache_dtype = torch.get_autocast_dtype(device) if autocast and device != "cpu" else None
        caches = []
        for k, v in prompt_kv:
            tp = k.shape[2]
            cache = k.new_empty(2, k.shape[0] * group_size, self.kv_heads, total, self.head_dim,
                                dtype=cache_dtype or k.dtype)
            cache[0, :, :, :tp] = k.repeat_interleave(group_size, dim=0)
            cache[1, :, :, :tp] = v.repeat_interleave(group_size, dim=0)
            caches.append(cache)
        return caches

    @torch.inference_mode()
    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
              max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The prompts ``(P, Tp)`` prefilled once and their cache repeated out to ``group_size`` rows
        each, prompt-major: the rows' ids ``(P*k, Tp)``, their next-token logits ``(P*k, V)`` and
        ``step_logits(tokens_just_chosen)``, which runs one token of every row: what
        :func:`zenalign.generation.decode.sample_loop` takes (run it under inference mode too)."""
        lean = self.lean
        p, tp = prompt_ids.shape
        n = p * group_size
        device = prompt_ids.device
        autocast = torch.is_autocast_enabled(device.type)
        weights = lean.weights(torch.get_autocast_dtype(device.type) if autocast else None)  # cast once, not per token
        last, prompt_kv = lean.prefill(prompt_ids, prompt_mask, weights)
        if autocast:  # the LM head's weight too: autocast would cast it again for every token
            head_weight = lean.model.lm_head.weight.to(torch.get_autocast_dtype(device.type))

            def head(h: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
                return F.linear(h, head_weight, bias)
        else:  # every step multiplies n rows by each weight: MKL's packed copies, made once per decode
            pack_for_rows(weights, n)
            head = _Packed.of(lean.model.lm_head.weight, n)
        total = tp + max_new_tokens
        caches = self.grouped_caches(prompt_kv, group_size, total)
        positions = mask_positions(prompt_mask)
        logits = lean.head(last).repeat_interleave(group_size, dim=0)
        tokens = prompt_ids.repeat_interleave(group_size, dim=0)
        # Additive mask over the cache: the prompts' padding is never seen; generated columns are
        # filled in order, and a step reads only the columns written so far.
        bias = torch.zeros(n, 1, 1, total, device=device)
        bias[:, 0, 0, :tp].masked_fill_(~prompt_mask.bool().repeat_interleave(group_size, dim=0), float("-inf"))
        state = {"positions": positions[:, -1].repeat_interleave(group_size), "column": tp}
        table = self.rotary_table(last, int(positions[:, -1].max()) + max_new_tokens + 1)

        def step_logits(previous: torch.Tensor) -> torch.Tensor:
            column = state["column"]  # where the previous token's keys and values go
            state["positions"] = state["positions"] + 1
            state["column"] = column + 1
            x = lean.body.embed_tokens(previous)
            positions = state["positions"]
            rotation = lean.rotary(x, positions) if table is None else table.index_select(0, positions)
            for i, w in enumerate(weights):
                q, k, v = lean.qkv(i, w, x, rotation)
                caches[i][0, :, :, column] = k
                caches[i][1, :, :, column] = v
                out = self.attend_one(q, caches[i][0, :, :, : column + 1], caches[i][1, :, :, : column + 1],
                                      bias[..., : column + 1])
                x = lean.finish(i, w, x, out, decoding=True)
            return lean.head(x, head)

        return tokens, logits, step_logits
