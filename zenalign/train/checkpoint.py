"""Checkpoints: everything a run needs to continue exactly, written atomically.

    checkpoints/step-00000040/
      policy/               save_pretrained (safetensors) + tokenizer: loads with from_pretrained
      engine/               optimizer + schedule (torch) or DeepSpeed's ZeRO state
      rng/rank-00000.*      python, numpy and torch RNG states of every rank (JSON + safetensors)
      plugins/<slot>/       state of stateful plugins (normalizer, rewards-<i>)
      reference.safetensors the KL reference, only once it was reset to the policy
      lagged/v<version>.safetensors  sampling.lag: the older policies the next steps sample with
      trainer_state.json    step, samples seen, data position, world size, what must not change
      recipe.yaml           the recipe that wrote it
      MANIFEST.json         size and sha256 of every file above, written last

A checkpoint is assembled in ``checkpoints/.tmp-step-...`` and renamed into place only when
complete, so a process killed while writing leaves the previous checkpoint untouched. Only
MANIFEST-bearing directories count as checkpoints, and resuming verifies every file against it.
Nothing here unpickles code: JSON, safetensors, and ``torch.load(weights_only=True)`` for the torch
optimizer state. DeepSpeed reads its own engine state with a full unpickler, so its files are first
opened with the weights-only one, allowing only DeepSpeed's own state classes
(:func:`zenalign.train.engine.refuse_pickled_code`).

What is saved is the run's :class:`~zenalign.train.state.TrainState` plus the parts named in
:class:`CheckpointParts`; this module never sees the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from zenalign.errors import ModelLoadError, NonFiniteError, one_line
from zenalign.models.lora import is_adapted
from zenalign.plugins import Stateful, StatefulDirectory
from zenalign.recipe.schema import MOVED_TO_LOSS, Recipe
from zenalign.train.distributed import Dist
from zenalign.train.state import TrainState

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
    """Check the checkpoint against its manifest, which must list exactly the files it holds (no
    missing entry, no extra file, no symbolic link anywhere, the directory itself included), each
    with its size and sha256; return trainer_state.json, checked for shape. Any failure is a
    one-line :class:`ModelLoadError`."""
    _refuse_links(directory)
    entries = _manifest_entries(directory)
    present = {(Path(root) / name).relative_to(directory).as_posix()
               for root, _, names in os.walk(directory) for name in names} - {MANIFEST}
    missing, extra = sorted(set(entries) - present), sorted(present - set(entries))
    if missing:
        raise ModelLoadError(f"checkpoint '{directory}' is corrupt: {missing[0]} is missing"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    if extra:
        raise ModelLoadError(f"checkpoint '{directory}' holds {extra[0]}"
                             f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, which its {MANIFEST} does "
                             f"not list; a checkpoint is used only as it was written")
    for name, entry in entries.items():
        path = directory / name
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise ModelLoadError(f"checkpoint '{directory}' is corrupt: {name} does not match its manifest (changed or truncated)")
    return _trainer_state(directory)


def _refuse_links(directory: Path) -> None:
    if directory.is_symlink():
        raise ModelLoadError(f"checkpoint '{directory}' is a symbolic link; a checkpoint is read only from a directory "
                             f"of its own (resume from '{directory.resolve()}' itself if you trust it)")
    for root, folders, names in os.walk(directory):
        for name in folders + names:
            if (Path(root) / name).is_symlink():
                inside = (Path(root) / name).relative_to(directory).as_posix()
                raise ModelLoadError(f"checkpoint '{directory}' holds a symbolic link ({inside}); zenalign never writes "
                                     f"one, and follows none when resuming")


def _manifest_entries(directory: Path) -> dict[str, dict[str, Any]]:
    where = f"checkpoint '{directory}' is unreadable: {MANIFEST}"
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{where}: {one_line(exc)}") from None
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ModelLoadError(f"{where}: 'files' must map every file of the checkpoint to its size and sha256 "
                             f"(found {type(entries).__name__}{' (empty)' if entries == {} else ''})")
    for name, entry in entries.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and not isinstance(entry["bytes"], bool)
                and isinstance(entry.get("sha256"), str)):
            raise ModelLoadError(f"{where}: the entry of '{name}' must be {{\"bytes\": int, \"sha256\": str}} "
                                 f"(found {one_line(repr(entry))[:80]})")
    return entries


def _trainer_state(directory: Path) -> dict[str, Any]:
    where = f"checkpoint '{directory}' is unreadable: trainer_state.json"
    try:
        saved = json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{where}: {one_line(exc)}") from None
    sampler = saved.get("sampler") if isinstance(saved, dict) else None
    counts = {"step": saved.get("step"), "samples": saved.get("samples")} if isinstance(saved, dict) else {}
    if isinstance(sampler, dict):
        counts.update({"sampler.epoch": sampler.get("epoch"), "sampler.index": sampler.get("index")})
    bad = [key for key in ("step", "samples", "sampler.epoch", "sampler.index")
           if not (isinstance(counts.get(key), int) and not isinstance(counts[key], bool) and counts[key] >= 0)]
    if bad:
        raise ModelLoadError(f"{where}: {bad[0]} must be a whole number >= 0 (found {counts.get(bad[0])!r})")
    if not isinstance(saved.get("fingerprint", {}), dict) or not isinstance(saved.get("plugins", []), list):
        raise ModelLoadError(f"{where}: 'fingerprint' must be a mapping and 'plugins' a list")
    return saved


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, or a one-line error naming it (a damaged header, a header
    that claims more than the file holds)."""
    try:
        return load_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"checkpoint file '{path}' could not be read as safetensors ({type(exc).__name__}: "
                             f"{one_line(exc)[:160]})") from None


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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_signature(model_dir: Path, blocks: int = 64, block_bytes: int = 1 << 16) -> Optional[str]:
    """A sampled hash of a model directory's weight files: their names and sizes, the first MiB of
    each (a safetensors header: every tensor's name, dtype and shape) and ``blocks`` blocks spread
    evenly over the rest. It tells two different trained models apart in milliseconds, where
    hashing all of a 14 GB model at each resume would take minutes; it could miss two models that
    differ only between its samples (a handful of changed tensors)."""
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(model_dir).as_posix()}:{size};".encode())
        with path.open("rb") as f:
            digest.update(f.read(1 << 20))
            for i in range(blocks):
                f.seek(size * i // blocks)
                digest.update(f.read(block_bytes))
    return digest.hexdigest()


# The loss options that were grpo fields before the loss owned them (grpo.clip_epsilon, ...): a resume
# may change them, as it may the rest of the step's settings, and checkpoints written before hold none.
STEP_LOSS_OPTIONS = frozenset(MOVED_TO_LOSS.values())


def fingerprint(recipe: Recipe, world_size: int, objective_names: tuple[str, ...],
                policy_config_dir: Optional[Path]) -> dict[str, Any]:
    """What must not change between the run that wrote a checkpoint and the one resuming it."""
    loss = recipe.loss.model_dump(mode="json") if recipe.loss is not None else None
    return {
        "model": model_signature(policy_config_dir) if policy_config_dir else {},
        "model.weights": weights_signature(policy_config_dir) if policy_config_dir else None,
        "rewards": [{k: v for k, v in entry.model_dump(mode="json").items() if k != "timeout_s"}
                    for entry in recipe.rewards],
        "sampling.group_size": recipe.sampling.group_size,
        "sampling.lag": recipe.sampling.lag,
        "grpo.prompts_per_step": recipe.grpo.prompts_per_step,
        "grpo.num_iterations": recipe.grpo.num_iterations,
        "engine.backend": recipe.engine.backend,
        "engine.zero_stage": recipe.engine.zero_stage,
        "processes": world_size,
        "objectives": list(objective_names),
        "model.lora": recipe.model.lora.model_dump(mode="json") if recipe.model.lora is not None else None,
        "loss": {k: v for k, v in loss.items() if k not in STEP_LOSS_OPTIONS} if loss is not None else None,
        "filters": [entry.model_dump(mode="json") for entry in recipe.filters],
        "normalizer.type": getattr(recipe.normalizer, "type", None),  # a stateful one (a critic) must not change
    }


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    for key, now in current.items():
        if key not in saved:  # written before this setting was recorded
            continue
        then = saved[key]
        if key in ("model", "model.weights") and (not then or not now):  # a model object given in Python
            continue
        if then != now:
            label = {"model": "the model (config.json)", "model.weights": "the model's weights (sampled sha256)",
                     "rewards": "rewards"}.get(key, key)
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


def _restore_rng(directory: Path, rank: int) -> None:
    """This rank's RNG states, or a one-line error naming the file whose content is not one."""
    plain_path = directory / "rng" / f"rank-{rank:05d}.json"
    tensors = read_tensors(directory / "rng" / f"rank-{rank:05d}.safetensors")
    before = _rng_state()
    try:
        plain = json.loads(plain_path.read_text(encoding="utf-8"))
        _set_rng_state(plain, tensors)
    except Exception as exc:  # a TypeError from random.setstate, a RuntimeError from torch's, a KeyError...
        _set_rng_state(*before)  # no half-restored state behind the error
        raise ModelLoadError(f"checkpoint '{directory}' is unreadable: {plain_path.relative_to(directory)} and its "
                             f".safetensors do not hold random states ({type(exc).__name__}: {one_line(exc)[:120]})") from None


def save_plugin_state(obj: Any, directory: Path) -> bool:
    """``save_state(dir)`` for a :class:`StatefulDirectory` plugin, else ``state_dict()`` as JSON + safetensors."""
    if isinstance(obj, StatefulDirectory):
        directory.mkdir(parents=True, exist_ok=True)
        obj.save_state(directory)
        return True
    if isinstance(obj, Stateful):
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
    if isinstance(obj, StatefulDirectory):
        obj.load_state(directory)
        return
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    if (directory / "state.safetensors").is_file():
        state.update(read_tensors(directory / "state.safetensors"))
    obj.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# save and restore


@dataclass
class CheckpointParts:
    """What a checkpoint reads or writes besides the :class:`TrainState`."""

    engine: Any  # policy weights, optimizer and schedule (zenalign.train.engine)
    dist: Dist
    tokenizer: Any
    reference: Optional[torch.nn.Module] = None  # saved only once it was reset to the policy
    lagged: Any = None  # sampling.lag: the older policy versions pending batches sample with (zenalign.train.lag)


def save_checkpoint(run_path: Path, state: TrainState, parts: CheckpointParts, fingerprint: dict[str, Any],
                    consolidate: bool, keep: int) -> Path | None:
    """Write a checkpoint of ``state.step`` (every rank takes part). Returns its path on rank 0."""
    dist = parts.dist
    root = checkpoints_root(run_path)
    name = f"{PREFIX}{state.step:08d}"
    staging = root / f".tmp-{name}"
    if dist.is_main:
        for stale in root.glob(f".tmp-{PREFIX}*") if root.is_dir() else []:  # an interrupted write of ours
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    try:
        _write_parts(staging, run_path, state, parts, fingerprint, consolidate)
    except BaseException:
        if dist.is_main:  # a full disk: do not leave a partial checkpoint holding the space
            shutil.rmtree(staging, ignore_errors=True)
        raise
    dist.barrier()
    final = root / name
    if dist.is_main:
        write_manifest(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_path)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final if dist.is_main else None


def _write_parts(staging: Path, run_path: Path, state: TrainState, parts: CheckpointParts, fingerprint: dict[str, Any],
                 consolidate: bool) -> None:
    dist = parts.dist
    _save_policy(staging / "policy", parts, consolidate)
    if dist.is_main and state.reference_was_reset:  # the reference no longer equals model.path: keep it
        save_file({k: v.detach().cpu().clone() for k, v in parts.reference.state_dict().items()},  # clone: tied weights
                  str(staging / "reference.safetensors"))
    parts.engine.save_state(staging / "engine")
    plain, tensors = _rng_state()
    _write_json(staging / "rng" / f"rank-{dist.rank:05d}.json", plain)
    save_file(tensors, str(staging / "rng" / f"rank-{dist.rank:05d}.safetensors"))
    if dist.is_main:
        saved_plugins = [slot for slot, obj in state.plugins.items() if save_plugin_state(obj, staging / "plugins" / slot)]
        _write_json(staging / "trainer_state.json", {"format": FORMAT, **state.to_json(), "plugins": sorted(saved_plugins),
                                                      "fingerprint": fingerprint, "consolidated": consolidate})
        shutil.copy(run_path / "recipe.yaml", staging / "recipe.yaml")
        if parts.lagged is not None:
            parts.lagged.save(staging / "lagged", state.step)


def check_finite(state: Optional[dict[str, torch.Tensor]], where: str) -> None:
    """Refuse to write weights holding a NaN or an infinity (naming the first such tensor)."""
    for name, tensor in (state or {}).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{where}: the policy's {name} holds NaN or infinite values; it was not written "
                                 f"(the checkpoints already written are intact)")


def _save_policy(directory: Path, parts: CheckpointParts, consolidate: bool) -> None:
    """The policy as a save_pretrained directory with its tokenizer (only its config when not
    consolidated: the weights are then in DeepSpeed's shards). A LoRA policy always saves its
    adapter, which is small, so export never has to rebuild adapters from shards."""
    if consolidate or is_adapted(parts.engine.model):
        weights = parts.engine.policy_state_dict()  # collective at ZeRO-3
        if parts.dist.is_main:
            check_finite(weights, f"checkpoint '{directory.parent.name}'")
            parts.engine.model.save_pretrained(directory, state_dict=weights, safe_serialization=True)
    elif parts.dist.is_main:
        parts.engine.model.config.save_pretrained(directory)
    if parts.dist.is_main:
        parts.tokenizer.save_pretrained(directory)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore(directory: Path, saved: dict[str, Any], state: TrainState, parts: CheckpointParts) -> None:
    """Everything but the policy weights (loaded from ``directory/policy`` when the policy is
    built): the engine's optimizer state, this rank's RNG, ``state`` and its plugins, and a reset
    reference."""
    parts.engine.load_state(directory / "engine")
    _restore_rng(directory, parts.dist.rank)
    state.load_json(saved)
    for slot, obj in state.plugins.items():
        if slot in saved.get("plugins", []):
            try:
                load_plugin_state(obj, directory / "plugins" / slot)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"checkpoint '{directory}': the state in plugins/{slot} could not be restored "
                                     f"({type(exc).__name__}: {one_line(exc)[:160]})") from None
    if parts.lagged is not None:
        parts.lagged.load(directory / "lagged", state.step, read_tensors)
    if (directory / "reference.safetensors").is_file() and parts.reference is not None:
        parts.reference.load_state_dict(read_tensors(directory / "reference.safetensors"), strict=False)
        state.reference_was_reset = True
