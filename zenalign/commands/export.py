"""``zenalign export``: a checkpoint's policy as a plain Hugging Face directory.

Checkpoints written with ``engine.consolidate_checkpoints`` (the default) already hold one in
``policy/``; it is copied. Otherwise the weights are rebuilt from DeepSpeed's ZeRO shards with
DeepSpeed's own ``zero_to_fp32`` and saved with the checkpoint's config and tokenizer.

A LoRA checkpoint's ``policy/`` holds the adapter: it is copied as it is (it loads with
``PeftModel.from_pretrained(base, OUT)``), or with ``--merge`` merged into its base model and
written as a plain model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from zenalign.errors import ModelLoadError, one_line
from zenalign.models.lora import holds_adapter, merge_adapter
from zenalign.train import checkpoint as ckpt
from zenalign.train.saving import check_new_directory


PLAIN = "loads with AutoModelForCausalLM.from_pretrained"


def export_checkpoint(source: Path, out: Path, merge: bool = False, base: Path | None = None) -> tuple[Path, str]:
    """Write the checkpoint's policy to ``out``; returns ``out`` and how it loads. ``out`` is checked
    first: nothing is read from the checkpoint for an export that could not be written."""
    check_new_directory(out, "export")
    directory = ckpt.find_checkpoint(str(source), source)
    state = ckpt.verify(directory)
    policy = directory / "policy"
    if holds_adapter(policy):
        if merge:
            return merge_adapter(policy, out, base), PLAIN
        shutil.copytree(policy, out, dirs_exist_ok=True)
        return out, "a LoRA adapter: loads with PeftModel.from_pretrained(base, OUT); --merge writes a merged model"
    if merge:
        raise ModelLoadError(f"export --merge: checkpoint '{directory}' holds a full model, not LoRA adapters; "
                             f"export it without --merge")
    if state.get("consolidated", True) and any(policy.glob("*.safetensors")):
        shutil.copytree(policy, out, dirs_exist_ok=True)
        return out, PLAIN
    return from_zero_shards(directory, policy, out), PLAIN


def from_zero_shards(directory: Path, policy: Path, out: Path) -> Path:
    zero = directory / "engine"
    if not (zero / "zero").is_dir():
        raise ModelLoadError(f"export: checkpoint '{directory}' has neither consolidated weights nor ZeRO shards")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from zenalign.train.distributed import prepare_deepspeed_env

    prepare_deepspeed_env()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from zenalign.train.engine import refuse_pickled_code

    refuse_pickled_code(zero, "export")  # zero_to_fp32 unpickles without weights_only
    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(zero), tag="zero")
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy))
        missing = set(model.load_state_dict(weights, strict=False).missing_keys) - set(getattr(model, "_tied_weights_keys", None) or ())
    except Exception as exc:
        raise ModelLoadError(f"export: cannot rebuild the policy from '{zero}': {type(exc).__name__}: {one_line(exc)}") from exc
    if missing:
        raise ModelLoadError(f"export: the ZeRO shards in '{zero}' do not hold the policy's weights "
                             f"({len(missing)} missing, e.g. {sorted(missing)[0]}); nothing was written")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out
