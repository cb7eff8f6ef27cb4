"""The lean forward's building blocks below the model: a layer's weights for one pass, the RMSNorm
and the linear products it runs (weights-first and MKL-packed products for decoding on a CPU), and
the custom autograd functions that keep less for backward than autograd would (:class:`_RMSNorm`,
:class:`_NormLinear`, :class:`_SwiGLUDown`, :class:`_OutProjection`; when a pass uses them:
:func:`_saves_less`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F


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
