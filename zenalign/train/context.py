"""The run context plugins receive (:class:`zenalign.plugins.RunContext`): a narrow view of the
run, never the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from zenalign.train.distributed import Dist
from zenalign.train.rundir import RunDir
from zenalign.train.state import TrainState


class TrainerContext:
    """Where the run is and what a plugin may do to it, backed by the trainer's state and process group."""

    def __init__(self, state: TrainState, dist: Dist, seed: int, output_dir: Path,
                 reset_reference: Callable[[], None], recipe: Optional[dict[str, Any]] = None):
        self._state = state
        self.recipe = recipe or {}
        self._dist = dist
        self._reset_reference = reset_reference
        self.seed = seed
        self.output_dir = output_dir

    @property
    def step(self) -> int:
        return self._state.step

    @property
    def run_id(self) -> str:
        """The run directory's id (its zenalign-run.json), written when the run began."""
        identity = RunDir(self.output_dir).identity()
        return identity["run_id"] if identity else ""

    @property
    def rank(self) -> int:
        return self._dist.rank

    @property
    def world_size(self) -> int:
        return self._dist.world_size

    @property
    def is_main(self) -> bool:
        return self._dist.is_main

    def gather_objects(self, items: list) -> list:
        return self._dist.gather_objects(items)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._dist.gather_rows(tensor)

    def reset_reference_to_policy(self) -> None:
        self._reset_reference()

    def __repr__(self) -> str:
        return f"RunContext(step={self.step}, rank={self.rank}, world_size={self.world_size}, output_dir='{self.output_dir}')"
