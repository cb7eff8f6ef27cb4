"""Everything that knows transformers: loading models and tokenizers, the lean forward for
Llama-family policies, attention settings, the primitives every model path shares, and reward
models (sequence classifiers)."""

from zenalign.models.loading import (
    check_model_dir,
    eos_token_ids,
    frozen_copy,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    prepare_tokenizer,
)

__all__ = ["check_model_dir", "eos_token_ids", "frozen_copy", "load_causal_lm", "load_tokenizer", "pick_device",
           "prepare_tokenizer"]
