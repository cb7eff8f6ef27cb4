"""The run directory: recipe.yaml, metrics.jsonl, eval.jsonl, samples.jsonl, run.log, final/.

Lines are appended and flushed as they are produced, so a run that stops (or is stopped) keeps
everything it wrote. An existing run is never overwritten unless the recipe says so, and then only
the files a run writes are removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import yaml

from zenalign.errors import RecipeError

RUN_FILES = ("recipe.yaml", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "run.log")
RUN_DIRS = ("final", "checkpoints")


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


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES + RUN_DIRS)

    def check(self, overwrite: bool) -> None:
        """Refuse a file, or an existing run unless ``overwrite``; changes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise RecipeError(f"run.output_dir: '{self.path}' is a file; choose a directory")
        if self.holds_run() and not overwrite:
            raise RecipeError(
                f"run.output_dir: '{self.path}' already holds a run; choose another directory "
                f"(run.output_dir=...) or replace it with run.overwrite=true"
            )

    def prepare(self, overwrite: bool) -> None:
        """Create the directory; with ``overwrite``, remove only the files a run writes."""
        self.check(overwrite)
        if self.holds_run():
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            for name in RUN_DIRS:
                shutil.rmtree(self.path / name, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_recipe(self, recipe: dict[str, Any]) -> None:
        text = yaml.safe_dump(recipe, sort_keys=False)
        (self.path / "recipe.yaml").write_text(text, encoding="utf-8")

    def append(self, name: str, records: Iterable[dict[str, Any]]) -> None:
        with (self.path / name).open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (they are about to be recomputed by a resumed run).
        Each file is rewritten atomically."""
        for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
            path = self.path / name
            if not path.exists():
                continue
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if line.strip() and _step_of(line) <= step]
            staging = path.with_suffix(".jsonl.tmp")
            staging.write_text("".join(kept), encoding="utf-8")
            os.replace(staging, path)

    def read(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
