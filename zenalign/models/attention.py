"""Attention in float32 under bf16 autocast on CPU.

torch's CPU flash-attention kernel is slow in bf16, above all its backward, which in bf16 takes a
large share of a small model's update and far longer than the same backward in fp32
(measurements: docs/performance-notes.md). So when
the torch engine runs bf16 autocast on a CPU, a model using ``sdpa`` attention is switched to
:func:`sdpa_in_float32`: query, key and value go to float32 for the attention product (and the
softmax, which then also runs at full precision) and the result returns to bf16. Linear layers,
where the FLOPs are, stay in bf16. GPUs keep their bf16 kernels.

The switch goes through transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``, so the
padding mask is the one sdpa gets); it is not written to saved configs.
"""

from __future__ import annotations

import torch

NAME = "zenalign_sdpa_fp32"


def sdpa_in_float32(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(dtype), weights


def float32_attention_on_cpu(model: torch.nn.Module, device: torch.device, precision: str) -> bool:
    """Switch ``model`` to :func:`sdpa_in_float32` for bf16 on a CPU; True if it was switched."""
    config = getattr(model, "config", None)
    if device.type != "cpu" or precision != "bf16" or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_in_float32)
    # The padding/causal mask is built by name too: without this transformers builds none.
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        model.set_attn_implementation(NAME)
    except (AttributeError, ValueError):  # older transformers, or a model that rejects custom attention
        return False
    return True
