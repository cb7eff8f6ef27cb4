"""The run directory: zenalign-run.json (the run's identity), recipe.yaml, metrics.jsonl,
eval.jsonl, samples.jsonl, run.log, final/, checkpoints/, attempts/ (each start's recipe, listed in
attempts.jsonl), abandoned/ (what a run resumed from an earlier step had written after it) and
reward-cache/ (what plugins cache, such as a remote judge's scores; kept when a run resumes).

Lines are appended and flushed as they are produced, so a run that stops (or is stopped) keeps
everything it wrote. A directory is a zenalign run only if it carries ``zenalign-run.json``, which
a run writes when it starts (or, for runs started before that file existed, an ``attempts.jsonl``
in zenalign's format). An existing run is never overwritten unless the recipe says so, and then
only the files a run writes are removed, by name and pattern (``checkpoints/step-NNNNNNNN``, not
``checkpoints/*``). A directory that is not empty and is not a zenalign run is refused; with
``run.overwrite`` a run may start beside its files only if none of them has a name a run writes,
so a file zenalign did not write is never removed, replaced or appended to.

While a run writes, it holds ``run.lock`` (its pid and host), taken atomically: a second run on the
same directory is refused; a lock left by a process that no longer exists on this host is taken over.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from zenalign.errors import RecipeError, StorageError, one_line

MARKER = "zenalign-run.json"
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "run.log", "attempts.jsonl", "trackers.json")
LINE_FILES = ("metrics.jsonl", "eval.jsonl", "samples.jsonl")
LOCK = "run.lock"
# What a run writes inside its folders, by pattern: nothing else in them is ever removed. final/ and
# final.tmp/ are written whole (save_pretrained into final.tmp, renamed), so they go whole.
RUN_DIRS = {
    "final": None,
    "final.tmp": None,
    "checkpoints": re.compile(r"(step-\d{8}|\.tmp-step-\d{8})"),
    "attempts": re.compile(r"\d{3,}\.yaml"),
    "abandoned": re.compile(r"after-step-\d{8}-\d{8}-\d{6}"),
    "tensorboard": re.compile(r"events\.out\.tfevents\..+"),
    "reward-cache": re.compile(r"[\w.-]+\.rank\d+\.jsonl"),  # plugins' caches, NAME.rankN.jsonl, kept on resume
}

log = logging.getLogger("zenalign")


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # an unreadable (half-written) line is dropped


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
_STORAGE_MARKERS = ("no space left on device", "os error 28", "disk quota exceeded", "read-only file system",
                    "os error 30", "permission denied", "file write failed", "file too large")


def storage_failure(exc: BaseException, run_dir: Path) -> Optional[StorageError]:
    """A one-line error for a write that failed because of the storage (None for anything else).
    Python raises OSError; safetensors and torch.save raise their own errors that carry the OS's
    message, which is matched instead."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:  # torch.save into a Python file: RuntimeError from OSError(28)
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    os_error = next((e for e in chain if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS), None)
    if os_error is not None:
        reason = f"{os_error.strerror} ({os_error.filename})" if os_error.filename else os_error.strerror
    elif any(marker in str(exc).lower() for marker in _STORAGE_MARKERS):
        reason = one_line(exc)[:200]
    else:
        return None
    return StorageError(f"cannot write the run in '{run_dir}': {reason}. The lines and checkpoints already written "
                        f"are intact (an unfinished checkpoint is removed); free space or choose another "
                        f"run.output_dir, then continue with --resume auto")


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.locked = False

    def holds(self, checkpoint: Path) -> bool:
        """Whether ``checkpoint`` lies inside this run directory."""
        return self.path.resolve() in Path(checkpoint).resolve().parents

    def begin(self, dist: Any, resumed_step: Optional[int], overwrite: bool, recipe: dict[str, Any]) -> None:
        """On the main process: take the lock, then either drop the lines after ``resumed_step`` (a
        resumed run) or prepare a fresh directory, and write the recipe; on an error the lock is
        released again. Every process learns of a failure (``dist.broadcast``) and raises it, so no
        rank waits for one that stopped."""
        failure: Optional[str] = None
        if dist.is_main:
            try:
                self.lock()
                if resumed_step is None:
                    self.prepare(overwrite)
                else:
                    self.mark()  # a run from before the identity file gets one
                    self.rewind_to(resumed_step)
                self.write_recipe(recipe)
                self.record_attempt(recipe, resumed_step)
            except RecipeError as exc:
                self.unlock()
                failure = str(exc)
            except OSError as exc:
                self.unlock()
                failure = f"run.output_dir: cannot write in '{self.path}': {exc.strerror or exc}"
        failure = dist.broadcast(failure)
        if failure:
            raise RecipeError(failure)

    def lock(self) -> None:
        """Create ``run.lock`` atomically (O_EXCL), or refuse with who holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._take_over_stale(path):
                    continue
                raise RecipeError(self._held_message(path)) from None
            except OSError as exc:
                raise RecipeError(f"run.output_dir: cannot write in '{self.path}': {exc.strerror or exc}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.locked = True
            return
        raise RecipeError(self._held_message(path))

    def unlock(self) -> None:
        if self.locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self.locked = False

    @staticmethod
    def _owner(path: Path) -> Optional[dict[str, Any]]:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _take_over_stale(self, path: Path) -> bool:
        """Remove a lock whose process is gone (same host, pid not running); True if removed."""
        owner = self._owner(path)
        if owner is None:  # being written right now, or garbage: stale only once it is old
            try:
                young = time.time() - path.stat().st_mtime < 10
            except FileNotFoundError:
                return True
            if young:
                return False
        elif owner.get("host") != socket.gethostname() or _alive(int(owner.get("pid", -1))):
            return False
        log.warning("run.output_dir: taking over %s left by process %s, which is no longer running", path,
                    (owner or {}).get("pid", "?"))
        path.unlink(missing_ok=True)
        return True

    def _held_message(self, path: Path) -> str:
        owner = self._owner(path) or {}
        return (f"run.output_dir: '{self.path}' is in use by process {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')} (since {owner.get('since', '?')}); wait for it to finish, or, if that "
                f"process is gone, remove {path}")

    def holds_run(self) -> bool:
        """Whether the directory holds anything a run writes (it may be another program's, too)."""
        return any((self.path / name).exists() for name in (MARKER, *RUN_FILES, *RUN_DIRS))

    def identity(self) -> Optional[dict[str, Any]]:
        """The run's ``zenalign-run.json`` (its run id), or None where there is none or it is unreadable."""
        try:
            found = json.loads((self.path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) and isinstance(found.get("run_id"), str) else None

    def is_run(self) -> bool:
        """Whether a zenalign run wrote this directory: its identity file, or (a run from before
        that file) an attempts.jsonl whose first line is zenalign's attempt record."""
        if self.identity() is not None:
            return True
        try:
            with (self.path / "attempts.jsonl").open(encoding="utf-8") as f:
                first = json.loads(f.readline())
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(first, dict) and {"attempt", "from_step", "recipe"} <= first.keys()

    def _entries(self) -> list[str]:
        try:
            return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def check(self, overwrite: bool, resuming: bool = False) -> None:
        """Refuse a file; an existing run unless ``overwrite`` (or ``resuming`` one of its own
        checkpoints); a directory that is not empty and not a zenalign run, unless ``overwrite``
        and none of its entries has a name a run writes. Changes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise RecipeError(f"run.output_dir: '{self.path}' is a file; choose a directory")
        entries = self._entries()
        if not entries or resuming:
            return
        if self.is_run():
            if not overwrite:
                raise RecipeError(
                    f"run.output_dir: '{self.path}' already holds a run; choose another directory "
                    f"(run.output_dir=...), continue it with --resume auto, or replace it with run.overwrite=true")
            return
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        if not overwrite:
            raise RecipeError(
                f"run.output_dir: '{self.path}' is not empty ({shown}) and is not a zenalign run (it has no {MARKER}); "
                f"choose a new or empty directory, or set run.overwrite=true to start a run beside those files "
                f"(zenalign never removes a file it did not write)")
        clash = [name for name in entries if name in (MARKER, *RUN_FILES, *RUN_DIRS)]
        if clash:
            raise RecipeError(
                f"run.output_dir: '{self.path}' is not a zenalign run (it has no {MARKER}) but holds "
                f"{', '.join(clash)}, which a run would write to; choose a new or empty directory")

    def prepare(self, overwrite: bool) -> None:
        """Create the directory and give it a new identity; with ``overwrite``, first remove the
        files an earlier run wrote there (only those, by name and pattern)."""
        self.check(overwrite)
        if self.is_run():
            self._remove_run_files()
        self.path.mkdir(parents=True, exist_ok=True)
        self.mark(new=True)

    def _remove_run_files(self) -> None:
        for name in (MARKER, *RUN_FILES):
            (self.path / name).unlink(missing_ok=True)
        for name, pattern in RUN_DIRS.items():
            folder = self.path / name
            if not folder.is_dir() or folder.is_symlink():
                continue
            if pattern is None:
                shutil.rmtree(folder)
                continue
            for entry in folder.iterdir():
                if pattern.fullmatch(entry.name) and not entry.is_symlink():
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()

    def mark(self, new: bool = False) -> None:
        """Write ``zenalign-run.json`` (a new run id if ``new`` or there is none), atomically."""
        if not new and self.identity() is not None:
            return
        identity = {"format": 1, "run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        staging = self.path / f"{MARKER}.tmp"
        staging.write_text(json.dumps(identity, indent=1) + "\n", encoding="utf-8")
        os.replace(staging, self.path / MARKER)

    def write_recipe(self, recipe: dict[str, Any]) -> None:
        text = yaml.safe_dump(recipe, sort_keys=False)
        (self.path / "recipe.yaml").write_text(text, encoding="utf-8")

    def append(self, name: str, records: Iterable[dict[str, Any]]) -> None:
        with (self.path / name).open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")
            f.flush()

    def record_attempt(self, recipe: dict[str, Any], resumed_step: Optional[int]) -> None:
        """Every start of the run keeps its recipe as ``attempts/NNN.yaml`` and a line in
        ``attempts.jsonl`` (the step it started from), so the run records what each stretch of
        steps was trained with; ``recipe.yaml`` is the latest."""
        number = len(self._lines(self.path / "attempts.jsonl")) + 1
        (self.path / "attempts").mkdir(exist_ok=True)
        (self.path / "attempts" / f"{number:03d}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False),
                                                                   encoding="utf-8")
        self.append("attempts.jsonl", [{"attempt": number, "from_step": resumed_step or 0,
                                        "recipe": f"attempts/{number:03d}.yaml", "pid": os.getpid(),
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}])

    @staticmethod
    def _lines(path: Path) -> list[str]:
        if not path.exists():
            return []
        return [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]

    def rewind_to(self, step: int) -> Optional[Path]:
        """A resumed run continues after ``step``. The lines of later steps are dropped from
        metrics/eval/samples (they are recomputed). If the run had gone further and left something
        lasting (a later checkpoint or ``final/``), that timeline is abandoned: its later
        checkpoints, ``final/`` and dropped lines move to ``abandoned/after-step-N-TIME/``, so that
        neither ``--resume auto`` nor checkpoint pruning ever picks them, and nothing is deleted.
        Returns that directory, if any."""
        later = [p for p in (self.path / "checkpoints").glob("step-*") if p.is_dir() and _checkpoint_step(p) > step]
        lines = {name: self._lines(self.path / name) for name in LINE_FILES}
        dropped = {name: [line for line in found if _step_of(line) > step] for name, found in lines.items()}
        final = self.path / "final"
        aside = None
        if later or (final.exists() and any(dropped.values())):
            aside = self.path / "abandoned" / f"after-step-{step:08d}-{time.strftime('%Y%m%d-%H%M%S')}"
            (aside / "checkpoints").mkdir(parents=True, exist_ok=True)
            for name, found in dropped.items():
                if found:
                    (aside / name).write_text("".join(found), encoding="utf-8")
            for checkpoint in later:
                os.replace(checkpoint, aside / "checkpoints" / checkpoint.name)
            if final.exists():
                os.replace(final, aside / "final")
            log.warning("resuming from step %d of a run that had gone further: its later checkpoints, final/ and "
                        "lines were moved to %s", step, aside)
        for name, found in lines.items():  # each file rewritten atomically
            if dropped[name]:
                staging = self.path / f"{name}.tmp"
                staging.write_text("".join(line for line in found if _step_of(line) <= step), encoding="utf-8")
                os.replace(staging, self.path / name)
        return aside

    def read(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
