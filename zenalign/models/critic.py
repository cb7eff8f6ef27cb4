"""A critic for PPO: a language model's transformer body with a one-output linear head on every
position, which is transformers' ``AutoModelForTokenClassification`` with ``num_labels=1``.

Loaded from a causal LM directory (usually the policy's), the body's weights come from it and the
head is new; the head starts at zero, so every value starts at 0 and the first advantages are the
rewards themselves. Dropout stays off (the critic always runs in eval mode; gradients still flow).
Saved with ``save_pretrained`` (safetensors) and loaded back the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zenalign.errors import ModelLoadError, one_line
from zenalign.models.loading import check_model_dir
from zenalign.models.primitives import mask_positions


class ValueModel(torch.nn.Module):
    """``values(sequences, attention_mask, prompt_length) -> (N, Tc)``: the value of the state
    before each completion token (the prompt and the tokens before it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def load(cls, path: Path, field: str, trust_remote_code: bool = False, fresh_head: bool = True) -> "ValueModel":
        from transformers import AutoModelForTokenClassification

        from transformers.utils import logging as hf_logging

        check_model_dir(path, field)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected here
        try:
            model = AutoModelForTokenClassification.from_pretrained(path, num_labels=1, trust_remote_code=trust_remote_code,
                                                                    dtype=torch.float32)
        except Exception as exc:
            raise ModelLoadError(f"{field}: cannot load '{path}' as a critic (a token-classification model with one "
                                 f"output): {type(exc).__name__}: {one_line(exc)}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        if fresh_head:
            children = dict(model.named_children())
            head = children.get("score") or children.get("classifier")
            if head is None:
                raise ModelLoadError(f"{field}: '{path}' ({type(model).__name__}) has no score or classifier head to "
                                     f"start at zero")
            with torch.no_grad():
                for param in head.parameters():
                    param.zero_()
        model.eval()
        return cls(model)

    def train(self, mode: bool = True) -> "ValueModel":
        return super().train(False)  # no dropout in the critic, ever

    def values(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
        out = self.model(input_ids=sequences, attention_mask=attention_mask,
                         position_ids=mask_positions(attention_mask)).logits[..., 0]   # (N, Tp + Tc)
        return out[:, prompt_length - 1 : -1].float()                                 # (N, Tc) before each token

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)
