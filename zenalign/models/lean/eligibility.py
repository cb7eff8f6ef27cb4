"""Which models take the lean forward: the eligibility rules (:func:`why_not_lean`), each model's
lean forward built once (:func:`lean_model`) and checked once against transformers' forward on the
first prompts it sees (:func:`checked_lean_model`)."""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch

from zenalign.models.lean.model import LeanLM

log = logging.getLogger("zenalign")

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
