"""The policy as a plain Hugging Face directory (safetensors and its tokenizer, loadable with
``from_pretrained``), outside the checkpoints: the run's ``final/``, ``trainer.save_model(dir)``
(TRL's name), and the check ``zenalign export`` shares. A LoRA policy is written as its adapter,
or merged into its base model (:func:`zenalign.models.lora.merge_adapter`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

from zenalign.errors import ModelLoadError, RecipeError
from zenalign.models.lora import is_adapted, merge_adapter
from zenalign.train.checkpoint import CheckpointParts, check_finite


def save_final(run_path: Path, parts: CheckpointParts) -> Optional[Path]:
    """The trained policy as ``RUN/final``; see :func:`save_policy`."""
    return save_policy(run_path / "final", parts, run_path / "final.tmp")


def save_policy(target: Path, parts: CheckpointParts, staging: Optional[Path] = None) -> Optional[Path]:
    """The policy as a save_pretrained directory (safetensors; a LoRA policy's adapter) with its
    tokenizer, written to ``staging`` (default: a new hidden directory beside ``target``) and renamed
    into place, replacing ``target``; its path on rank 0. Every rank takes part (ZeRO-3 gathers)."""
    state = parts.engine.policy_state_dict()  # collective at ZeRO-3
    if not parts.dist.is_main:
        return None
    check_finite(state, target.name)
    if staging is None:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    shutil.rmtree(staging, ignore_errors=True)
    try:
        parts.engine.model.save_pretrained(staging, state_dict=state, safe_serialization=True)
        parts.tokenizer.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def check_new_directory(out: Path, where: str) -> None:
    """``out`` may be written: it does not exist, or is an empty directory."""
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"{where}: '{out}' is an existing file; give a new directory to write the policy into")
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"{where}: '{out}' already exists and is not empty; choose a new directory")


def save_model(parts: CheckpointParts, run_path: Path, output_dir: Optional[str | Path] = None, merge: bool = False,
               base: Optional[str | Path] = None) -> Optional[Path]:
    """The policy as it is now, with its tokenizer, in a new (or empty) directory that loads with
    ``AutoModelForCausalLM.from_pretrained``; a LoRA policy as its adapter
    (``PeftModel.from_pretrained(base, DIR)``), or with ``merge`` merged into its base model (``base``,
    or the directory the adapter records), as ``zenalign export`` writes them. Without
    ``output_dir``, or with the run directory (where TRL saves), it is the run's ``final/``. Every
    process takes part (ZeRO-3 gathers); returns the directory on rank 0."""
    into_run = output_dir is None or Path(output_dir).resolve() == run_path.resolve()
    if merge and not is_adapted(parts.engine.model):
        raise RecipeError("save_model(merge=True): the policy has no LoRA adapters to merge; save it without merge")
    if merge and into_run:
        raise RecipeError("save_model(merge=True): give an output_dir for the merged model; the run's final/ keeps "
                          "its adapter")
    if into_run:
        return save_final(run_path, parts)
    out = Path(output_dir)
    check_new_directory(out, "save_model")
    if not merge:
        return save_policy(out, parts)
    with tempfile.TemporaryDirectory() as scratch:  # the adapter, as a checkpoint holds it, then merged
        adapter = save_policy(Path(scratch) / "adapter", parts)
        if not parts.dist.is_main:
            return None
        return merge_adapter(adapter, out, Path(base) if base else None, "save_model(merge=True)", "base=DIR")
