"""Model code: loading models and tokenizers, the lean forward for Llama-family policies (a
package), attention settings, the primitives every model path shares, the log-prob passes of
sampled completions (chunked over the LM head), reward models (sequence classifiers), LoRA and
the critic."""

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
