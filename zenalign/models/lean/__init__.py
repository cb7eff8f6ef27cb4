"""A lean forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

transformers' module forward is written for every use at once: it builds attention masks layer by
layer from a 2D padding mask, dispatches attention by name, updates cache objects, and runs
through decorators and keyword plumbing on every call. On small models that bookkeeping costs
more than the arithmetic (measurements: docs/performance-notes.md). GRPO calls the model in two fixed
shapes, so this module runs those two shapes directly on the model's own weights:

- :meth:`LeanDecoder.start` (decoding): prefill each distinct prompt once, then one token per step
  for all ``P * k`` rows, with a preallocated key/value cache held as plain tensors;
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

The package: :mod:`~zenalign.models.lean.eligibility` (which models, built and checked once),
:mod:`~zenalign.models.lean.kernels` (a layer's products, norms and custom autograd functions),
:mod:`~zenalign.models.lean.model` (:class:`LeanLM`: the layers and the log-prob pass) and
:mod:`~zenalign.models.lean.decode` (:class:`LeanDecoder`: the prefill and the KV cache of decoding).
"""

from zenalign.models.lean.decode import LeanDecoder
from zenalign.models.lean.eligibility import SUPPORTED, checked_lean_model, lean_model, why_not_lean
from zenalign.models.lean.kernels import RECOMPUTE_FROM, pack_for_rows
from zenalign.models.lean.model import SMALL_ATTENTION, LeanLM, additive_mask, attention_products, padded_causal_mask

__all__ = ["SUPPORTED", "SMALL_ATTENTION", "RECOMPUTE_FROM", "LeanDecoder", "LeanLM", "additive_mask",
           "attention_products", "checked_lean_model", "lean_model", "pack_for_rows", "padded_causal_mask",
           "why_not_lean"]
