"""Checkpoints: everything a run needs to continue exactly, written atomically.

    checkpoints/step-00000040/
      policy/               save_pretrained (safetensors) + tokenizer: loads with from_pretrained
      engine/               optimizer + schedule (torch) or DeepSpeed's ZeRO state
      rng/rank-00000.*      python, numpy and torch RNG states of every rank (JSON + safetensors)
      plugins/<slot>/       state of stateful plugins (normalizer, rewards-<i>)
      reference.safetensors the KL reference, only once it was reset to the policy
      trainer_state.json    step, samples seen, data position, world size, what must not change
      recipe.yaml           the recipe that wrote it
      MANIFEST.json         size and sha256 of every file above, written last

A checkpoint is assembled in ``checkpoints/.tmp-step-...`` and renamed into place only when
complete, so a process killed while writing leaves the previous checkpoint untouched. Only
MANIFEST-bearing directories count as checkpoints, and resuming verifies every file against it.
Nothing here unpickles: JSON, safetensors, and ``torch.load(weights_only=True)`` for the torch
optimizer state (DeepSpeed reads its own engine state).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from zenalign.data import SamplerState
from zenalign.errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from zenalign.trainer import GRPOTrainer

PREFIX = "step-"
MANIFEST = "MANIFEST.json"
FORMAT = 1


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(spec: str, run_dir: Path) -> Path | None:
    """``auto``: the newest checkpoint of ``run_dir``, or None to start fresh. Otherwise a path to
    a checkpoint, or to a run directory (its newest checkpoint)."""
    if spec == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(f"--resume: '{spec}' does not exist; give a checkpoint directory (RUN/checkpoints/step-...), a run directory, or auto")
    if (path / MANIFEST).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if path.name.startswith(".tmp-") or path.name.startswith(PREFIX):
        raise ModelLoadError(f"--resume: '{spec}' is an incomplete checkpoint (no {MANIFEST}); it was interrupted while being written")
    raise ModelLoadError(f"--resume: '{spec}' holds no checkpoint; give RUN/checkpoints/step-... or a run directory with checkpoints/")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    entries = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_json(directory / MANIFEST, {"format": FORMAT, "files": entries})


def verify(directory: Path) -> dict[str, Any]:
    """Check every file against the manifest; return trainer_state.json."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        entries = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"checkpoint '{directory}' is unreadable: {MANIFEST}: {exc}") from exc
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            raise ModelLoadError(f"checkpoint '{directory}' is corrupt: {name} is missing")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise ModelLoadError(f"checkpoint '{directory}' is corrupt: {name} does not match its manifest (changed or truncated)")
    try:
        return json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"checkpoint '{directory}' is unreadable: trainer_state.json: {exc}") from exc


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------
# what must match between the run that wrote a checkpoint and the one resuming it


def model_signature(config_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: config.get(k) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")}


def fingerprint(trainer: "GRPOTrainer") -> dict[str, Any]:
    r = trainer.recipe
    return {
        "model": model_signature(trainer.policy_config_dir) if trainer.policy_config_dir else {},
        "sampling.group_size": r.sampling.group_size,
        "grpo.prompts_per_step": r.grpo.prompts_per_step,
        "grpo.num_iterations": r.grpo.num_iterations,
        "engine.backend": r.engine.backend,
        "engine.zero_stage": r.engine.zero_stage,
        "processes": trainer.dist.world_size,
        "objectives": list(trainer.objectives.names),
    }


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    for key, now in current.items():
        then = saved.get(key)
        if key == "model" and (not then or not now):
            continue
        if then != now:
            label = "the model (config.json)" if key == "model" else key
            raise ModelLoadError(
                f"--resume: checkpoint '{where}' was written with {label} = {then}; this run has {now}. "
                f"Resume with the same setting, or start a new run in another run.output_dir"
            )


# ------------------------------------------------------------------------------------------------
# RNG and plugin state


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(state), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return plain, tensors


def _set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_plugin_state(obj: Any, directory: Path) -> bool:
    """``save_state(dir)`` if the plugin has it, else ``state_dict()`` as JSON + safetensors."""
    if hasattr(obj, "save_state"):
        directory.mkdir(parents=True, exist_ok=True)
        obj.save_state(directory)
        return True
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        state = obj.state_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / "state.json", plain)
        if tensors:
            save_file(tensors, str(directory / "state.safetensors"))
        return True
    return False


def load_plugin_state(obj: Any, directory: Path) -> None:
    if hasattr(obj, "load_state"):
        obj.load_state(directory)
        return
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    if (directory / "state.safetensors").is_file():
        state.update(load_file(str(directory / "state.safetensors")))
    obj.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# save and restore


def save_checkpoint(trainer: "GRPOTrainer") -> Path | None:
    """Write a checkpoint of the current step (every rank takes part). Returns its path on rank 0."""
    dist = trainer.dist
    root = checkpoints_root(trainer.run_dir.path)
    name = f"{PREFIX}{trainer.step:08d}"
    staging = root / f".tmp-{name}"
    if dist.is_main:
        for stale in root.glob(".tmp-*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    if trainer.recipe.engine.consolidate_checkpoints:
        state = trainer.engine.policy_state_dict()  # collective at ZeRO-3
        if dist.is_main:
            trainer.engine.model.save_pretrained(staging / "policy", state_dict=state, safe_serialization=True)
    elif dist.is_main:
        trainer.engine.model.config.save_pretrained(staging / "policy")
    if dist.is_main:
        trainer.tokenizer.save_pretrained(staging / "policy")
        if trainer.reference_was_reset:  # the reference no longer equals model.path: keep it
            save_file({k: v.detach().cpu().clone() for k, v in trainer.reference.state_dict().items()},  # clone: tied weights
                      str(staging / "reference.safetensors"))
    trainer.engine.save_state(staging / "engine")
    plain, tensors = _rng_state()
    _write_json(staging / "rng" / f"rank-{dist.rank:05d}.json", plain)
    save_file(tensors, str(staging / "rng" / f"rank-{dist.rank:05d}.safetensors"))
    if dist.is_main:
        plugins = {}
        for slot, obj in trainer.stateful_plugins().items():
            if save_plugin_state(obj, staging / "plugins" / slot):
                plugins[slot] = True
        _write_json(staging / "trainer_state.json", {
            "format": FORMAT,
            "step": trainer.step,
            "samples": trainer.samples_seen,
            "sampler": {"epoch": trainer.sampler.state.epoch, "index": trainer.sampler.state.index},
            "plugins": sorted(plugins),
            "fingerprint": fingerprint(trainer),
            "consolidated": trainer.recipe.engine.consolidate_checkpoints,
        })
        shutil.copy(trainer.run_dir.path / "recipe.yaml", staging / "recipe.yaml")
    dist.barrier()
    final = root / name
    if dist.is_main:
        write_manifest(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _fsync_dir(root)
        for old in list_checkpoints(trainer.run_dir.path)[: -trainer.recipe.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final if dist.is_main else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore(trainer: "GRPOTrainer", directory: Path, state: dict[str, Any]) -> None:
    """Everything but the policy weights, which the trainer loads from ``directory/policy``."""
    trainer.engine.load_state(directory / "engine")
    rank = trainer.dist.rank
    plain = json.loads((directory / "rng" / f"rank-{rank:05d}.json").read_text(encoding="utf-8"))
    _set_rng_state(plain, load_file(str(directory / "rng" / f"rank-{rank:05d}.safetensors")))
    trainer.step = int(state["step"])
    trainer.samples_seen = int(state["samples"])
    trainer.sampler.state = SamplerState(**state["sampler"])
    trainer.sampler.reorder()
    for slot, obj in trainer.stateful_plugins().items():
        if slot in state.get("plugins", []):
            load_plugin_state(obj, directory / "plugins" / slot)
    if (directory / "reference.safetensors").is_file() and trainer.reference is not None:
        trainer.reference.load_state_dict(load_file(str(directory / "reference.safetensors")), strict=False)
        trainer.reference_was_reset = True
