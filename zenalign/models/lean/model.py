"""The lean forward of one eligible model (:class:`LeanLM`): its weights laid out for a pass, a
layer's parts (q/k/v with the rotary embedding, attention, output projection and MLP), the update's
log-prob pass with each group's prompt run once (:meth:`LeanLM.group_hidden`) and the prompts'
prefill; and the attention masks and products those use. Decoding: :mod:`zenalign.models.lean.decode`."""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zenalign.models.lean.kernels import (_add_linear, _add_linear_weights_first, _CpuAutocastOff,
                                          _linear_weights_first, _NormLinear, _OutProjection, _rms_norm, _saves_less,
                                          _swiglu, _SwiGLUDown, _Weights, _weights_first)
from zenalign.models.primitives import mask_positions, product_dtype

_SDPA_GQA = torch.__version__ >= (2, 5)  # scaled_dot_product_attention(enable_gqa=...)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask as the float32 one attention kernels add to the scores (0 or
    -inf). Given to the fused kernel as is, it is the tensor the kernel keeps for backward: one
    for every layer of a pass, where a boolean mask is converted, and kept, in each layer."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def padded_causal_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, T)`` boolean attention mask for left-padded rows: each real token sees the real
    tokens up to itself; a padding position sees only itself (its output is never used, and a
    query that sees nothing would turn into NaN)."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal & mask.bool()[:, None, :]
    return (allowed | torch.eye(length, dtype=torch.bool, device=mask.device))[:, None]


# Above this many attention scores per call (B * heads * T * S; 16 MiB in float32) a CPU pass
# uses torch's fused attention kernel. Below it, two batched products and a softmax are used:
# the fused kernel's blocking costs more than the arithmetic on GRPO's short sequences, while on
# large score tensors the fused kernel wins and does not keep the scores for its backward pass
# (measurements, and where the two cross: docs/performance-notes.md).
SMALL_ATTENTION = 1 << 22


def attention_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale, masked) v`` as batched products: ``(B, H, T, D)`` queries over
    ``(B, KV, S, D)`` keys and values, a ``(B, 1, T, S)`` mask (boolean, or additive: 0 or -inf)
    in which every query sees at least one key. Query heads are grouped under their key/value
    head (head ``h`` uses ``h // (H / KV)``, as in transformers), so keys and values are not
    repeated."""
    b, h, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    scores = torch.bmm(q.reshape(b * kv, g * t, d), k.reshape(b * kv, s, d).transpose(1, 2))
    scores = scores.view(b, kv, g, t, s).mul_(scale)
    if mask.dtype == torch.bool:
        scores.masked_fill_(~mask[:, :, None], float("-inf"))
    else:
        scores.add_(mask[:, :, None])
    probs = scores.view(b * kv, g * t, s).softmax(dim=-1)
    return torch.bmm(probs, v.reshape(b * kv, s, d)).view(b, h, t, d)


class LeanLM:
    """The lean forward of one eligible model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        self._model = weakref.ref(model)  # the model owns this (see eligibility._LEAN), not the other way round
        config = model.config
        self.body = model.model
        attn = self.body.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.eps = self.body.norm.variance_epsilon
        self.qk_norm = hasattr(attn, "q_norm")
        self.vocab = config.vocab_size
        self.checked = False  # against transformers' forward, see checked_lean_model

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    # ------------------------------------------------------------------------------------- parts

    def weights(self, dtype: Optional[torch.dtype] = None) -> list[_Weights]:
        """Every layer's weights for one pass (differentiable: gradients reach the parameters).
        ``dtype`` casts the matrices once, for passes that run many steps under autocast."""
        # transformers rotates dimension j with j + D/2; with q and k rows reordered to
        # (0, D/2, 1, D/2 + 1, ...) the pairs sit side by side and the rotation is one complex
        # product. Queries and keys share the order, so their dot products are unchanged.
        half = torch.arange(self.head_dim // 2, device=self.body.embed_tokens.weight.device)
        pairs = torch.stack([half, half + self.head_dim // 2], dim=1).reshape(-1)

        def qk_rows(t: Optional[torch.Tensor], heads: int) -> Optional[torch.Tensor]:
            if t is None:
                return None
            return t.view(heads, self.head_dim, *t.shape[1:]).index_select(1, pairs).reshape(t.shape)

        def matrix(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if dtype is not None else t

        out = []
        for layer in self.body.layers:
            a, m = layer.self_attn, layer.mlp
            biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
            qkv_bias = None
            if any(b is not None for b in biases):
                q_b, k_b, v_b = (b if b is not None else lin.weight.new_zeros(lin.out_features)
                                 for b, lin in zip(biases, (a.q_proj, a.k_proj, a.v_proj)))
                qkv_bias = torch.cat([qk_rows(q_b, self.heads), qk_rows(k_b, self.kv_heads), v_b])
            qkv_parts = (qk_rows(a.q_proj.weight, self.heads), qk_rows(a.k_proj.weight, self.kv_heads), a.v_proj.weight)
            gate_up_parts = (m.gate_proj.weight, m.up_proj.weight)
            gate_up_bias = None
            if m.gate_proj.bias is not None or m.up_proj.bias is not None:
                gate_up_bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                                          for lin in (m.gate_proj, m.up_proj)])
            out.append(_Weights(
                qkv=matrix(torch.cat(qkv_parts)), qkv_parts=qkv_parts if dtype is None else (),
                qkv_bias=qkv_bias,
                o=matrix(a.o_proj.weight), o_bias=a.o_proj.bias,
                gate_up=matrix(torch.cat(gate_up_parts)), gate_up_parts=gate_up_parts if dtype is None else (),
                gate_up_bias=gate_up_bias,
                down=matrix(m.down_proj.weight), down_bias=m.down_proj.bias,
                input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                q_norm=a.q_norm.weight.index_select(0, pairs) if self.qk_norm else None,
                k_norm=a.k_norm.weight.index_select(0, pairs) if self.qk_norm else None,
            ))
        return out

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The rotation for flat ``positions`` ``(T,)`` as complex numbers ``(T, 1, D/2)``,
        from the model's own rotary module (so scaled and extended variants come out right)."""
        cos, sin = self.body.rotary_emb(x, positions[None])
        half = self.head_dim // 2
        return torch.complex(cos[0, :, None, :half].float(), sin[0, :, None, :half].float())

    def qkv(self, i: int, w: _Weights, x: torch.Tensor, rotation: torch.Tensor, halves: bool = False):
        """Flat hidden ``(T, hidden)`` -> queries ``(T, H, D)``, keys and values ``(T, KV, D)``,
        queries and keys rotated (in float32, as transformers does under autocast). ``halves``: the
        norm and the product as one :class:`_NormLinear` (see :func:`_saves_less`)."""
        if halves:
            qkv = _NormLinear.apply(x, w.input_norm, w.qkv, w.qkv_bias, self.eps, product_dtype(x, w.qkv), w.qkv_parts)
        else:
            h = _rms_norm(x, w.input_norm, self.eps)
            qkv = w.packed["qkv"](h, w.qkv_bias) if w.packed else F.linear(h, w.qkv, w.qkv_bias)
        qkv = qkv.view(x.shape[0], self.heads + 2 * self.kv_heads, self.head_dim)
        # split, not sliced: the backward of a slice fills a zero tensor of the whole and copies
        # into it, one per slice, then sums them; a split's concatenates the parts' gradients
        qk, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=1)
        if self.qk_norm:
            attn = self.body.layers[i].self_attn
            qk = torch.cat([_rms_norm(qk[:, : self.heads], w.q_norm, attn.q_norm.variance_epsilon),
                            _rms_norm(qk[:, self.heads :], w.k_norm, attn.k_norm.variance_epsilon)], dim=1)
        dtype = torch.promote_types(qk.dtype, x.dtype)  # transformers rotates in the residual's dtype
        qk = torch.view_as_real(torch.view_as_complex(qk.float().reshape(*qk.shape[:-1], -1, 2)) * rotation)
        qk = qk.reshape(*qk.shape[:-2], self.head_dim).to(dtype)
        q, k = qk.split([self.heads, self.kv_heads], dim=1)
        return q, k, v

    def finish(self, i: int, w: _Weights, x: torch.Tensor, attended: torch.Tensor,
               decoding: bool = False) -> torch.Tensor:
        """Output projection, residual, MLP, residual. ``attended`` is ``(T, H, D)``, or the
        attention outputs ``(B, H, T, D)`` of the pass's parts, in order (a log-prob pass on the
        halves, see :func:`_saves_less`). ``decoding``: a decoding step (:mod:`zenalign.models.lean.decode`)
        or its prefill, whose MLP products may run weights-first (:func:`_weights_first`)."""
        if isinstance(attended, (list, tuple)):
            dtype = product_dtype(x, w.o)
            rows = [out.shape[0] * out.shape[2] for out in attended]
            x = torch.cat([_OutProjection.apply(part, out, w.o, w.o_bias, dtype)
                           for part, out in zip(x.split(rows), attended)])
            return self.mlp(w, x, halves=True)
        if w.packed:
            x = x + w.packed["o"](attended.reshape(x.shape[0], -1), w.o_bias)
            gate_up = w.packed["gate_up"](_rms_norm(x, w.post_norm, self.eps), w.gate_up_bias)
            return x + w.packed["down"](_swiglu(gate_up), w.down_bias)
        return self.mlp(w, _add_linear(x, attended.reshape(x.shape[0], -1), w.o, w.o_bias), decoding=decoding)

    def mlp(self, w: _Weights, x: torch.Tensor, halves: bool = False, decoding: bool = False) -> torch.Tensor:
        """The MLP half of a layer and its residual: on the halves that recompute (see
        :func:`_saves_less`), or as plain products, weights-first only in decoding."""
        if halves:
            gate_up = _NormLinear.apply(x, w.post_norm, w.gate_up, w.gate_up_bias, self.eps, product_dtype(x, w.gate_up),
                                        w.gate_up_parts)
            return _SwiGLUDown.apply(x, gate_up, w.down, w.down_bias, product_dtype(gate_up, w.down))
        h = _rms_norm(x, w.post_norm, self.eps)
        if decoding and _weights_first(h):
            gate_up = _linear_weights_first(h, w.gate_up, w.gate_up_bias)
            return _add_linear_weights_first(x, _swiglu(gate_up), w.down, w.down_bias)
        return _add_linear(x, _swiglu(F.linear(h, w.gate_up, w.gate_up_bias)), w.down, w.down_bias)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               cast: bool = True) -> torch.Tensor:
        """Scaled dot-product attention over ``(B, heads, T, D)`` queries and ``(B, kv_heads, S, D)``
        keys/values with a ``(B, 1, T, S)`` mask, boolean or :func:`additive_mask`. On a CPU under
        autocast it runs in float32 (torch's bf16 CPU attention kernels are slow, above all
        backward) and its output is cast to autocast's dtype, unless ``cast`` is false; on a CPU
        with at most :data:`SMALL_ATTENTION` scores it is written out as two batched products
        (:func:`attention_products`). On a GPU: :meth:`attend_on_device`."""
        if q.device.type != "cpu":
            return self.attend_on_device(q, k, v, mask)
        gqa = self.kv_heads != self.heads
        if gqa and not _SDPA_GQA:  # torch < 2.5: repeat each key/value head for its query heads
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
            gqa = False

        def fused(q, k, v):
            bias = mask if mask.dtype == torch.bool else mask.to(q.dtype)
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=bias, scale=self.scaling,
                                                  **({"enable_gqa": gqa} if gqa else {}))

        autocast = torch.is_autocast_enabled("cpu")
        small = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= SMALL_ATTENTION
        if not (small or autocast):
            return fused(q, k, v)
        dtype = torch.get_autocast_dtype("cpu") if autocast else q.dtype
        with _CpuAutocastOff():  # in float32
            out = (attention_products(q.float(), k.float(), v.float(), mask, self.scaling) if small
                   else fused(q.float(), k, v))
        return out.to(dtype) if cast else out

    def attend_on_device(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:meth:`attend` on a GPU: torch's fused kernel in autocast's dtype where autocast is on.
        Every lean call has a mask, which SDPA's flash kernel does not take, and its
        memory-efficient kernel takes no ``enable_gqa``: a masked call with ``enable_gqa`` would
        run the math kernel, which holds every score (transformers repeats the heads for the same
        reason). So each key/value head is repeated for its query heads here, and the call runs
        the memory-efficient kernel (``tests/test_device.py`` pins that under ``sdpa_kernel``)."""
        device = q.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if self.kv_heads != self.heads:
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        bias = mask if mask.dtype == torch.bool else mask.to(dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)

    @property
    def checkpointing(self) -> bool:
        """Whether transformers' gradient checkpointing is on for this model, in training mode."""
        flag = getattr(self.model, "is_activation_checkpointing", None)
        if flag is None:
            flag = getattr(self.body, "gradient_checkpointing", False)
        return bool(flag) and self.model.training

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return _rms_norm(h, self.body.norm.weight, self.eps)

    def head(self, h: torch.Tensor, product: Optional[Callable[..., torch.Tensor]] = None) -> torch.Tensor:
        """The final norm and the LM head; ``product(h, bias)`` stands in for the head's own
        product where a decode prepared its weight once (packed, or cast for autocast)."""
        h = self.final_norm(h)
        return product(h, self.model.lm_head.bias) if product is not None else self.model.lm_head(h)

    # ------------------------------------------------------------------------------------ passes

    def group_logits(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                     leaders: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """The ``(N, Tc, V)`` logits of :meth:`group_hidden`'s positions."""
        return self.head(self.group_hidden(sequences, attention_mask, prompt_length, leaders, owner))

    def group_hidden(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                     leaders: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """The ``(N, Tc, hidden)`` last-layer states (before the final norm: :meth:`head` applies
        it) that predict each completion token of ``sequences`` (prompt left-padded to
        ``prompt_length``, then the completion), with each group's prompt run once.

        ``leaders`` are the first rows of each group, ``owner`` maps every row to its group (see
        :func:`zenalign.models.primitives.prompt_groups`). The last completion token is never an input whose
        output is needed, so it is left out.
        """
        tp = prompt_length
        prompts, prompt_mask = sequences[leaders, :tp], attention_mask[leaders, :tp]
        inputs, mask = sequences[:, tp:-1], attention_mask[:, :-1]
        g, n, tc = prompts.shape[0], inputs.shape[0], inputs.shape[1]
        positions = mask_positions(mask)
        flat_positions = torch.cat([mask_positions(prompt_mask).reshape(-1),
                                    positions[:, tp:].reshape(-1)])
        x = self.body.embed_tokens(torch.cat([prompts.reshape(-1), inputs.reshape(-1)]))
        rotation = self.rotary(x, flat_positions)
        prompt_attn = additive_mask(padded_causal_mask(prompt_mask))
        # A completion token sees its prompt's real tokens and its own completion up to itself.
        causal = torch.ones(tc, tc, dtype=torch.bool, device=x.device).tril()
        completion_attn = additive_mask(torch.cat([prompt_mask.bool()[owner][:, None, :].expand(n, tc, tp),
                                                   causal.expand(n, tc, tc)], dim=2)[:, None])
        split = g * tp

        def layer(i: int, w: _Weights, x: torch.Tensor) -> torch.Tensor:
            halves = _saves_less(x, w.post_norm)  # with autograd or without: see _saves_less
            q, k, v = self.qkv(i, w, x, rotation, halves)
            # With the halves, what attention keeps is copied out of the q/k/v rows (the prompts'
            # queries, keys and values, the completions' queries), so that the rows themselves
            # (rotated queries and keys, or the product's q/k/v, the completions' keys and values
            # being kept in their concatenated copies) are not kept through views; and attention's
            # float32 output goes to the output projection as the kernel keeps it, with no cast
            # copy under autocast.
            (qp, qc), (kp, kc), (vp, vc) = (t.split([split, n * tc]) for t in (q, k, v))
            qp, kp, vp, qc = (t.contiguous() if halves else t for t in (qp, kp, vp, qc))
            qp, kp, vp = (t.view(g, tp, -1, self.head_dim).transpose(1, 2) for t in (qp, kp, vp))
            qc, kc, vc = (t.view(n, tc, -1, self.head_dim).transpose(1, 2) for t in (qc, kc, vc))
            out_p = self.attend(qp, kp, vp, prompt_attn, cast=not halves)
            out_c = self.attend(qc, torch.cat([kp.index_select(0, owner), kc], dim=2),
                                torch.cat([vp.index_select(0, owner), vc], dim=2), completion_attn, cast=not halves)
            if halves:
                return self.finish(i, w, x, [out_p, out_c])
            attended = torch.cat([out_p.transpose(1, 2).reshape(split, -1), out_c.transpose(1, 2).reshape(n * tc, -1)])
            return self.finish(i, w, x, attended)

        recompute = self.checkpointing and torch.is_grad_enabled()  # engine.gradient_checkpointing, as transformers does it
        for i, w in enumerate(self.weights()):
            x = checkpoint(layer, i, w, x, use_reentrant=False) if recompute else layer(i, w, x)
        last = x[:split].view(g, tp, -1)[:, -1]  # each prompt's last position predicts the first token
        return torch.cat([last.index_select(0, owner)[:, None], x[split:].view(n, tc, -1)], dim=1)

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, weights: list[_Weights]):
        """Left-padded prompts ``(P, Tp)`` through every layer: the last position's hidden state
        ``(P, hidden)`` and each layer's keys and values ``(P, KV, Tp, D)``."""
        p, tp = prompt_ids.shape
        positions = mask_positions(prompt_mask)
        x = self.body.embed_tokens(prompt_ids.reshape(-1))
        rotation = self.rotary(x, positions.reshape(-1))
        prompt_attn = padded_causal_mask(prompt_mask)
        kv = []
        for i, w in enumerate(weights):
            q, k, v = self.qkv(i, w, x, rotation)
            q, k, v = (t.view(p, tp, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
            kv.append((k, v))
            attended = self.attend(q, k, v, prompt_attn).transpose(1, 2).reshape(p * tp, -1)
            x = self.finish(i, w, x, attended, decoding=True)
        return x.view(p, tp, -1)[:, -1], kv

    @torch.no_grad()
    def agrees_with_transformers(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Optional[str]:
        """Run up to four prompts through both forwards; None if the next-token log-probabilities
        agree (1e-3, or 5e-2 under autocast or with bf16/fp16 weights), else what differed (or what
        the lean forward raised). :func:`checked_lean_model` calls this once per model, so a
        variant of these architectures that the eligibility rules miss falls back to transformers'
        forward instead of training on other numbers or stopping the run."""
        ids, mask = prompt_ids[:4], prompt_mask[:4]
        plain = self.model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask),
                           use_cache=False).logits[:, -1]
        try:
            lean = self.head(self.prefill(ids, mask, self.weights())[0])
        except (RuntimeError, AttributeError, TypeError, ValueError) as error:  # a layout the rules did not foresee
            return f"{type(error).__name__}: {error}"
        diff = float((torch.log_softmax(lean.float(), -1) - torch.log_softmax(plain.float(), -1)).abs().max())
        low_precision = torch.is_autocast_enabled(ids.device.type) or self.body.embed_tokens.weight.dtype != torch.float32
        limit = 5e-2 if low_precision else 1e-3
        return None if diff <= limit else f"next-token log-probs differ by {diff:.2e} (limit {limit:.0e})"
