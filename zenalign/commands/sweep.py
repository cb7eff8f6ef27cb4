"""``zenalign sweep``: one run per point of a recipe's ``sweep`` section.

    sweep:
      grid: {run.seed: [0, 1, 2]}
      weights:
        - {helpful: 1, harmless: 1, honest: 1}
        - {helpful: 3, harmless: 1, honest: 1}

Every combination of the grid values and weightings becomes a set of overrides; each point runs
in ``sweep.output_dir/<point>`` one after the other. A point whose run finished is skipped, and an
interrupted one resumes from its newest checkpoint, so a sweep can be restarted as it is.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from zenalign.errors import RecipeError
from zenalign.recipe.loader import LoadedRecipe, load_recipe

log = logging.getLogger("zenalign")


@dataclass
class SweepPoint:
    name: str
    overrides: list[str]


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def sweep_points(loaded: LoadedRecipe, objective_names: Sequence[str]) -> list[SweepPoint]:
    sweep = loaded.recipe.sweep
    if sweep is None or not (sweep.grid or sweep.weights):
        raise RecipeError(f"{loaded.source}: sweep: the recipe has no sweep section; add sweep: {{grid: ..., weights: [...]}}")
    for i, weights in enumerate(sweep.weights):
        for name in weights:
            if name not in objective_names:
                raise RecipeError(
                    f"{loaded.source}: sweep.weights[{i}].{name}: unknown objective; produced: {', '.join(objective_names)}"
                )
        if not any(weights.values()):
            raise RecipeError(f"{loaded.source}: sweep.weights[{i}]: every weight is 0; give at least one a non-zero weight")
    keys = list(sweep.grid)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))] or [{}]
    weightings = sweep.weights or [None]
    points = []
    for values, weights in itertools.product(grid, weightings):
        overrides = [f"{key}={_value_text(value)}" for key, value in values.items()]
        parts = [f"{key.split('.')[-1]}={_value_text(value)}" for key, value in values.items()]
        if weights is not None:
            overrides += [f"objectives.{name}.weight={w}" for name, w in weights.items()]
            parts.append("w-" + "-".join(f"{name}={w:g}" for name, w in weights.items()))
        name = "_".join(parts).replace("/", "-").replace(" ", "") or "default"
        points.append(SweepPoint(name, overrides))
    return points


def run_sweep(path: Path, overrides: Sequence[str]) -> list[tuple[SweepPoint, Path, dict[str, Any]]]:
    """Run every point; returns (point, run directory, final eval) for each."""
    from zenalign.train.trainer import GRPOTrainer

    from zenalign.train.checkpoint import list_checkpoints

    loaded = load_recipe(path, overrides)
    names = GRPOTrainer.from_recipe(loaded).check().names
    root = Path(loaded.recipe.sweep.output_dir.replace("{recipe}", loaded.name)) if loaded.recipe.sweep else None
    results = []
    for point in sweep_points(loaded, names):
        out = root / point.name
        if (out / "final").is_dir() and (out / "eval.jsonl").is_file():
            log.info("sweep: %s finished earlier; skipped", point.name)
        else:
            log.info("sweep: %s (%s)", point.name, " ".join(point.overrides))
            # an interrupted point resumes from its checkpoint; one with none starts over
            restart = [] if list_checkpoints(out) else ["run.overwrite=true"]
            point_recipe = load_recipe(path, [*overrides, *point.overrides, f"run.output_dir={out}", *restart])
            GRPOTrainer.from_recipe(point_recipe).train(resume="auto")
        evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines() if line.strip()]
        results.append((point, out, evals[-1] if evals else {}))
    return results
