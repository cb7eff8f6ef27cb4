"""``zenalign export``: a checkpoint's policy as a plain Hugging Face directory.

Checkpoints written with ``engine.consolidate_checkpoints`` (the default) already hold one in
``policy/``; it is copied. Otherwise the weights are rebuilt from DeepSpeed's ZeRO shards with
DeepSpeed's own ``zero_to_fp32`` and saved with the checkpoint's config and tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from zenalign.train import checkpoint as ckpt
from zenalign.errors import ModelLoadError, one_line


def export_checkpoint(source: Path, out: Path) -> Path:
    directory = ckpt.find_checkpoint(str(source), source)
    state = ckpt.verify(directory)
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"export: '{out}' already exists and is not empty; choose a new directory")
    policy = directory / "policy"
    if state.get("consolidated", True) and any(policy.glob("*.safetensors")):
        shutil.copytree(policy, out, dirs_exist_ok=True)
        return out
    zero = directory / "engine"
    if not (zero / "zero").is_dir():
        raise ModelLoadError(f"export: checkpoint '{directory}' has neither consolidated weights nor ZeRO shards")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from zenalign.train.distributed import prepare_deepspeed_env

    prepare_deepspeed_env()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(zero), tag="zero")
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy))
        model.load_state_dict(weights, strict=False)
    except Exception as exc:
        raise ModelLoadError(f"export: cannot rebuild the policy from '{zero}': {type(exc).__name__}: {one_line(exc)}") from exc
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out
