"""A lean forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

transformers' module forward is written for every use at once: it builds attention masks layer by
layer from a 2D padding mask, dispatches attention by name, updates cache objects, and runs
through decorators and keyword plumbing on every call. On small models that bookkeeping costs
more than the arithmetic (measurements: docs/performance-notes.md). GRPO calls the model in two fixed
shapes, so this module runs those two shapes directly on the model's own weights:

- :meth:`LeanLM.decode`: prefill each distinct prompt once, then one token per step for all
  ``P * k`` rows, with a preallocated key/value cache held as plain tensors;
- :meth:`LeanLM.group_hidden`: the update's log-prob pass with each group's prompt run once,
  in the *same* pass as its completions: every linear layer sees all tokens of the batch as one
  matrix, and only attention is laid out per sequence (the prompts attend causally among
  themselves; each completion attends to its group's prompt and causally to itself).

Per layer there is one matrix product for q, k and v (their weights concatenated) and one for
the MLP's gate and up projections, the rotary embedding is applied to queries and keys together,
and masks and rotary tables are built once per pass, not once per layer. The arithmetic is the
model's own: its RMSNorm in float32, its rotary embedding module, its attention scaling, SiLU
MLP, tied or untied LM head. Autograd runs through it unchanged, so the update differentiates
the same function. ``tests/models/test_fastpath.py`` pins log-probs, every parameter's gradient and the
sampled tokens to transformers' own forward and ``generate``. A log-prob pass without autograd
(the reference's, pi_old's) runs the operations of the update's pass in its order, so on equal
weights it gives the update's log-probs to the bit (``tests/models/test_lean_bitwise.py``): a KL term
against the policy's own weights is then exactly 0, and so is its gradient.

A model is eligible when it is one of those classes with plain ``nn.Linear`` projections (no
LoRA or quantised layers), full attention in every layer (no sliding window), SiLU, no tensor
parallel slicing, and no attention dropout while training; anything else uses transformers'
forward (:func:`lean_model` returns None and says why in :func:`why_not_lean`). On its first use
with a model, the lean forward is checked against transformers' on the prompts at hand
(:func:`checked_lean_model`); if they disagree, the run warns and keeps transformers' forward.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zenalign.models.primitives import mask_positions, product_dtype, sample_loop

log = logging.getLogger("zenalign")

_SDPA_GQA = torch.__version__ >= (2, 5)  # scaled_dot_product_attention(enable_gqa=...)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def why_not_lean(model: torch.nn.Module) -> Optional[str]:
    """Why ``model`` cannot take the lean path, or None if it can."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not one of {', '.join(SUPPORTED)}"
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the lean path implements silu)"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "sliding-window attention layers"
    if getattr(config, "sliding_window", None) and name == "MistralForCausalLM":
        return "sliding-window attention"
    if (getattr(config, "pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
        return "an unexpected module layout"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(m) is not torch.nn.Linear for m in linears):
            return "projections that are not plain nn.Linear (adapters or quantised layers)"
    if type(model.lm_head) is not torch.nn.Linear:
        return "an LM head that is not a plain nn.Linear"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "DeepSpeed ZeRO-3 partitions its parameters (they are gathered by module hooks)"
    return None


# Each model's lean forward (or False: not eligible), for as long as the model lives: kept beside the
# model rather than on it, so nothing of zenalign's is added to a user's model object.
_LEAN: "weakref.WeakKeyDictionary[torch.nn.Module, LeanLM | bool]" = weakref.WeakKeyDictionary()


def lean_model(model: torch.nn.Module) -> Optional["LeanLM"]:
    """The lean forward for ``model`` (built once per model), or None if it is not eligible."""
    cached = _LEAN.get(model)
    if cached is not None:
        return cached or None
    reason = why_not_lean(model)
    if reason is not None:
        log.info("the lean forward does not run %s (%s); using transformers' forward", type(model).__name__, reason)
    lean = LeanLM(model) if reason is None else False
    _remember(model, lean)
    return lean or None


def checked_lean_model(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Optional["LeanLM"]:
    """:func:`lean_model`, checked once against transformers' forward on the first prompts it
    sees (:meth:`LeanLM.agrees_with_transformers`); a model that fails the check uses
    transformers' forward from then on, with a warning that says why."""
    lean = lean_model(model)
    if lean is None or lean.checked:
        return lean
    problem = lean.agrees_with_transformers(prompt_ids, prompt_mask)
    lean.checked = True
    if problem is None:
        return lean
    log.warning("the lean forward disagrees with transformers' forward for %s (%s); using transformers' forward "
                "(set engine.lean_forward: false to skip the check)", type(model).__name__, problem)
    _remember(model, False)
    return None


def _remember(model: torch.nn.Module, lean) -> None:
    _LEAN[model] = lean


@dataclass
class _Weights:
    """One layer's weights for a pass: q/k/v and gate/up concatenated, q and k rows laid out for
    the complex-number rotary embedding (see :meth:`LeanLM.weights`)."""

    qkv: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    o: torch.Tensor
    o_bias: Optional[torch.Tensor]
    gate_up: torch.Tensor
    gate_up_bias: Optional[torch.Tensor]
    down: torch.Tensor
    down_bias: Optional[torch.Tensor]
    input_norm: torch.Tensor  # the layer's two RMSNorm weights, as they are
    post_norm: torch.Tensor
    q_norm: Optional[torch.Tensor] = None
    k_norm: Optional[torch.Tensor] = None
    packed: Optional[dict[str, "_Packed"]] = None  # decoding: MKL's packed copies (see pack_for_rows)
    qkv_parts: tuple = ()  # what qkv and gate_up concatenate, for _NormLinear to keep instead
    gate_up_parts: tuple = ()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-family RMSNorm: normalise in float32, cast back, scale (one fused
    kernel when everything is float32 already, as the residual stream is under autocast: torch's
    fused one where it has it, which gives F.rms_norm's values to the bit, while F.rms_norm on a
    CPU runs as separate operations, 3.5x slower at 4,128 x 576)."""
    if x.dtype == weight.dtype == torch.float32:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _RMSNorm.apply(x, weight, eps)
        return _rms_norm_and_rstd(x, weight, eps)[0]
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


_FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)  # (output, 1 / rms); torch >= 2.8


def _rms_norm_and_rstd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.rms_norm(x, weight)`` and each row's reciprocal RMS: from torch's fused kernel, which
    returns both, where this torch has one for the device; else computed apart."""
    if _FUSED_RMS_NORM is not None:
        try:
            return _FUSED_RMS_NORM(x, [x.shape[-1]], weight, eps)
        except RuntimeError:  # no kernel for this device (NotImplementedError is a RuntimeError)
            pass
    return F.rms_norm(x, (x.shape[-1],), weight, eps), torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))


class _RMSNorm(torch.autograd.Function):
    """``F.rms_norm(x, weight)`` over the last dimension, float32, with the gradient written out.
    torch's CPU backward for it is a chain of a dozen generic operations, while the closed form
    needs only the saved input and each row's reciprocal RMS, which the forward already has
    (measurements: docs/performance-notes.md). With ``r`` the reciprocal RMS of a row and ``xh = x * r``:
    ``dw = sum over rows of g * xh`` and ``dx = r * (g*w - xh * mean(g*w * xh))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = _rms_norm_and_rstd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd
        grad_weight = (grad * normed).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight
            grad_x = grad_normed.sub_(normed * (grad_normed * normed).mean(-1, keepdim=True)).mul_(rstd)
        return grad_x, grad_weight, None


def _add_linear(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + a @ weight.T (+ bias)``, the residual add fused into the product where that keeps
    the dtypes (not under autocast, where the residual stays float32 and the product does not)."""
    if bias is None and not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype:
        return torch.addmm(x, a, weight.t())
    return x + F.linear(a, weight, bias)


def _weights_first(x: torch.Tensor) -> bool:
    """Whether a decoding step's MLP products run as ``(weight @ x.T).T`` instead of ``x @ weight.T``:
    on a CPU, without autograd, at 32 rows or more. MKL's and oneDNN's CPU kernels handle a product
    whose short side is the batch better with the weight as the left operand, and the MLP's output
    product then takes the activations in the layout this leaves them in; decoding samples the
    same tokens either way (measurements: docs/performance-notes.md). Below 32 rows the libraries switch
    kernels (and rounding). Only decoding (prefill and each token) asks: the log-prob passes keep
    the plain form with or without autograd, since the other orientation rounds differently and
    the reference's and pi_old's log-probs must equal the update's to the bit."""
    return x.device.type == "cpu" and x.shape[0] >= 32 and not torch.is_grad_enabled()


def _linear_weights_first(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x.T).T`` (see :func:`_weights_first`)."""
    out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return out.t()


def _add_linear_weights_first(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + a @ weight.T (+ bias)`` with the product as ``(weight @ a.T).T``; the residual is
    added separately so that it keeps its row-major layout for the next layer."""
    return x + _linear_weights_first(a, weight, bias)


def _mkl_linear_op() -> Any:
    try:
        return torch.ops.mkl._mkl_linear if torch.backends.mkl.is_available() else None
    except (AttributeError, RuntimeError):  # a build without MKL
        return None


_MKL_LINEAR = _mkl_linear_op()


@dataclass
class _Packed:
    """A float32 weight ``(out, in)`` with MKL's packed copy of it for products of exactly ``rows``
    rows (``cblas_sgemm_pack``): MKL lays the matrix out once in the blocks its kernel reads, so a
    product with few rows no longer repacks the weight on every call. Decoding multiplies the same
    ``rows`` rows by every weight once per token: at the 135m shape a token is 1.09x faster over
    32 new tokens and 1.24x over 128 (packing is paid once per decode), with the same sums (the
    same kernel; equal to the bit; measurements: docs/performance-notes.md). A product of another row
    count runs ``F.linear`` on the plain weight."""

    weight: torch.Tensor
    packed: torch.Tensor
    rows: int

    @classmethod
    def of(cls, weight: torch.Tensor, rows: int) -> Optional["_Packed"]:
        if _MKL_LINEAR is None or weight.dtype != torch.float32 or weight.device.type != "cpu" or rows < 1:
            return None
        return cls(weight, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows), rows)

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[0] != self.rows:
            return F.linear(x, self.weight, bias)
        return _MKL_LINEAR(x, self.packed, self.weight, bias, self.rows)


def pack_for_rows(weights: list[_Weights], rows: int) -> None:
    """Give each layer's four matrices MKL's packed copies for products of ``rows`` rows, where this
    torch has MKL and the matrices are float32 on the CPU (not under autocast, which casts them to
    bf16 first). For inference only: the packed copy is not differentiable and does not follow
    later changes to the weight, so a decode packs afresh each time."""
    for w in weights:
        packed = {name: _Packed.of(getattr(w, name), rows) for name in ("qkv", "o", "gate_up", "down")}
        w.packed = packed if all(p is not None for p in packed.values()) else None


class _CpuAutocastOff:
    """``torch.autocast("cpu", enabled=False)`` for the per-layer, per-token hot path: it only
    switches CPU autocast off and back on. Building a ``torch.autocast`` object runs argument
    checks in Python, paid once per layer and token, a visible share of a small model's decode
    (measurements: docs/performance-notes.md); its other work (nesting count, cache clearing at the
    outermost exit) has nothing to do inside an enclosing autocast region, the only place this
    is used."""

    __slots__ = ("enabled",)

    def __enter__(self) -> None:
        self.enabled = torch.is_autocast_enabled("cpu")
        if self.enabled:
            torch.set_autocast_enabled("cpu", False)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            torch.set_autocast_enabled("cpu", True)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


class _NormLinear(torch.autograd.Function):
    """``F.linear(rms_norm(x) * norm_weight, weight, bias)`` (float32 ``x`` and norm weight; the
    product in :func:`~zenalign.models.primitives.product_dtype`, as autocast would run it). It saves ``x`` and each row's
    reciprocal RMS, which the norm's backward needs anyway, and not the normalised rows: backward
    recomputes them (one elementwise pass) for the weight's gradient. Autograd through the two
    would keep both, one more ``(T, hidden)`` tensor per norm, two per layer. With ``parts`` (what
    ``weight`` concatenates: the layer's q, k and v, or gate and up, rows) it keeps those and
    concatenates them again in backward, so the pass's concatenated copies of every layer's
    weights (278 MB at the 135m shape in fp32) are not held until backward."""

    @staticmethod
    def forward(ctx, x, norm_weight, weight, bias, eps: float, dtype: torch.dtype, parts: tuple = ()):
        h, rstd = _rms_norm_and_rstd(x, norm_weight, eps)
        ctx.save_for_backward(x, norm_weight, rstd, bias, *(() if parts else (weight,)))
        ctx.parts, ctx.dtype = parts, dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(h.to(dtype), weight.to(dtype), _cast(bias, dtype))

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, rstd, bias, *kept = ctx.saved_tensors
        weight = torch.cat(ctx.parts) if ctx.parts else kept[0]
        dtype = ctx.dtype
        normed = x * rstd
        grad_d = grad.to(dtype).reshape(-1, grad.shape[-1])
        grad_weight = grad_bias = grad_x = grad_norm = None
        if ctx.needs_input_grad[2]:
            grad_weight = (grad_d.t() @ (normed * norm_weight).to(dtype).reshape(-1, x.shape[-1])).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_d.sum(0).to(bias.dtype)
        grad_h = (grad_d @ weight.to(dtype)).view(x.shape).to(x.dtype)                    # d/d(normed * norm_weight)
        if ctx.needs_input_grad[1]:
            grad_norm = (grad_h * normed).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            grad_normed = grad_h.mul_(norm_weight)
            grad_x = grad_normed.sub_(normed * (grad_normed * normed).mean(-1, keepdim=True)).mul_(rstd)
        return grad_x, grad_norm, grad_weight, grad_bias, None, None, None


class _SwiGLUDown(torch.autograd.Function):
    """``x + F.linear(silu(gate) * up, down, bias)`` from the fused ``(T, 2I)`` gate/up product: the
    MLP's second half and its residual. It saves the gate/up product alone and recomputes
    ``silu(gate) * up`` in backward, where the down projection's weight gradient needs it;
    autograd would keep that ``(T, I)`` activation as well.

    The gradient of the gate/up product is written over the saved product itself, which nothing
    reads after this backward: autograd's own would build the two halves and then concatenate
    them, a copy of the largest activation in the layer, and a fresh ``(T, 2I)`` tensor is a fresh
    mapping of tens of megabytes at realistic shapes, every page faulted in again
    (measurements: docs/performance-notes.md). A second backward through the same graph
    (``retain_graph=True``) therefore stops with autograd's error about a saved tensor modified
    in place; no update runs one."""

    @staticmethod
    def forward(ctx, x, gate_up, down, bias, dtype: torch.dtype):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        ctx.save_for_backward(gate_up, down, bias)
        ctx.dtype = dtype
        return _add_linear(x, act, down, bias)  # in dtype: autocast's, or the inputs'

    @staticmethod
    def backward(ctx, grad):
        gate_up, down, bias = ctx.saved_tensors
        dtype = ctx.dtype
        gate, up = gate_up.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        grad_d = grad.to(dtype)
        grad_down = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_down = (grad_d.t() @ (silu_gate * up).to(dtype)).to(down.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_d.sum(0).to(bias.dtype)
        grad_act = (grad_d @ down.to(dtype)).to(gate_up.dtype)                            # (T, I)
        # over the saved product, each element read before it is written: gate, then up
        torch.ops.aten.silu_backward.grad_input(grad_act * up, gate, grad_input=gate)
        torch.mul(grad_act, silu_gate, out=up)
        return grad, gate_up, grad_down, grad_bias, None


class _OutProjection(torch.autograd.Function):
    """``x + F.linear(out, o, bias)`` with attention's output ``out`` taken as ``(B, H, T, D)``,
    the layout the attention kernel returns and keeps for its own backward. The product needs
    ``(B T, H D)`` rows, a transposed copy that autograd would keep beside the kernel's; here it is
    made in forward, dropped, and made again in backward."""

    @staticmethod
    def forward(ctx, x, out, o, bias, dtype: torch.dtype):
        ctx.save_for_backward(out, o, bias)
        ctx.dtype = dtype
        return _add_linear(x, _heads_to_rows(out), o, bias)

    @staticmethod
    def backward(ctx, grad):
        out, o, bias = ctx.saved_tensors
        dtype = ctx.dtype
        grad_d = grad.to(dtype)
        grad_o = (grad_d.t() @ _heads_to_rows(out).to(dtype)).to(o.dtype) if ctx.needs_input_grad[2] else None
        grad_bias = grad_d.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
        b, h, t, d = out.shape
        grad_out = (grad_d @ o.to(dtype)).view(b, t, h, d).transpose(1, 2).to(out.dtype)
        return grad, grad_out, grad_o, grad_bias, None


def _heads_to_rows(out: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, D)`` -> ``(B T, H D)``."""
    return out.transpose(1, 2).reshape(out.shape[0] * out.shape[2], -1)


RECOMPUTE_FROM = 1 << 20  # residual-stream elements (tokens x hidden) of a pass from which layers recompute


def _saves_less(x: torch.Tensor, norm_weight: torch.Tensor) -> bool:
    """Whether a layer of a log-prob pass runs on :class:`_NormLinear`, :class:`_SwiGLUDown` and
    :class:`_OutProjection`: on a float32 residual stream (float32 weights, under autocast or
    not), in a pass of at least :data:`RECOMPUTE_FROM` residual elements. What they save for the
    update's backward grows with the pass (about 49 MB a layer at the 135m shape's 4,608 x 576);
    what they cost is mostly fixed, a Python-level autograd function per half, which at
    1M-parameter shapes (about 1,060 x 128) made the update 8% slower to save about 1 MB a layer
    (docs/performance-notes.md). The passes without autograd (the reference's, pi_old's) take the same
    choice, so that they run the update's products in the update's order (the halves split the
    output projection at the prompts, and copy attention's inputs out): their log-probs then
    equal the update's to the bit on equal weights, and the KL term's gradient is exactly zero
    there. Without autograd the halves save nothing (no graph keeps their context)."""
    return x.dtype == norm_weight.dtype == torch.float32 and x.numel() >= RECOMPUTE_FROM


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


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
        self._model = weakref.ref(model)  # the model owns this (see _LEAN), not the other way round
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

    def rotary_table(self, x: torch.Tensor, length: int) -> Optional[torch.Tensor]:
        """:meth:`rotary` for every position below ``length``, for decoding to index instead of
        recomputing each token; None where the model's rotary embedding depends on the positions
        it is called with (dynamic and longrope scaling update their frequencies from them)."""
        rope_type = getattr(self.body.rotary_emb, "rope_type", "default")
        if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
            return None
        return self.rotary(x, torch.arange(length, device=x.device))

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
        halves, see :func:`_saves_less`). ``decoding``: a step of :meth:`decode` or its prefill,
        whose MLP products may run weights-first (:func:`_weights_first`)."""
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

    @torch.inference_mode()
    def decode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int, max_new_tokens: int,
               eos: torch.Tensor, pad_id: int, processors: Any) -> torch.Tensor:
        """What :func:`zenalign.grpo.rollout.decode_groups` does, on the lean forward: ``(P*k, Tp + T)`` ids."""
        p, tp = prompt_ids.shape
        n = p * group_size
        device = prompt_ids.device
        autocast = torch.is_autocast_enabled(device.type)
        weights = self.weights(torch.get_autocast_dtype(device.type) if autocast else None)  # cast once, not per token
        last, prompt_kv = self.prefill(prompt_ids, prompt_mask, weights)
        if autocast:  # the LM head's weight too: autocast would cast it again for every token
            head_weight = self.model.lm_head.weight.to(torch.get_autocast_dtype(device.type))

            def head(h: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
                return F.linear(h, head_weight, bias)
        else:  # every step multiplies n rows by each weight: MKL's packed copies, made once per decode
            pack_for_rows(weights, n)
            head = _Packed.of(self.model.lm_head.weight, n)
        total = tp + max_new_tokens
        # The cache's dtype: float32 on a CPU, where single-query attention runs in float32 (see
        # attend_one); on a GPU under autocast, autocast's dtype, which its attention kernel reads
        # (half the memory and bandwidth of float32, and no cast of the whole cache per token).
        cache_dtype = torch.get_autocast_dtype(device.type) if autocast and device.type != "cpu" else None
        caches = []
        for k, v in prompt_kv:  # the group's rows start from the same prompt cache, preallocated for every new token
            # every column is written before it is read
            cache = k.new_empty(2, n, self.kv_heads, total, self.head_dim, dtype=cache_dtype or k.dtype)
            cache[0, :, :, :tp] = k.repeat_interleave(group_size, dim=0)
            cache[1, :, :, :tp] = v.repeat_interleave(group_size, dim=0)
            caches.append(cache)
        positions = mask_positions(prompt_mask)
        logits = self.head(last).repeat_interleave(group_size, dim=0)
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
            x = self.body.embed_tokens(previous)
            positions = state["positions"]
            rotation = self.rotary(x, positions) if table is None else table.index_select(0, positions)
            for i, w in enumerate(weights):
                q, k, v = self.qkv(i, w, x, rotation)
                caches[i][0, :, :, column] = k
                caches[i][1, :, :, column] = v
                out = self.attend_one(q, caches[i][0, :, :, : column + 1], caches[i][1, :, :, : column + 1],
                                      bias[..., : column + 1])
                x = self.finish(i, w, x, out, decoding=True)
            return self.head(x, head)

        return sample_loop(tokens, logits, step_logits, max_new_tokens, eos, pad_id, processors)
