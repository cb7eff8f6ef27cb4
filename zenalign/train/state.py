"""The run state: what a checkpoint saves and restores besides weights, optimizer and RNG.

``TrainState`` is the one object that knows where a run is: the step, how many completions it
has trained on, the prompt sampler's position, the plugins whose state goes into checkpoints, and
whether the KL reference has been reset to the policy (then checkpoints carry its weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from zenalign.data import SamplerState
from zenalign.plugins import Stateful, StatefulDirectory


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    sampler: SamplerState = field(default_factory=SamplerState)
    plugins: dict[str, Any] = field(default_factory=dict)  # slot ("normalizer", "rewards-0") -> stateful plugin
    reference_was_reset: bool = False
    # sampling.lag: where the prompt sampler stood before the batches generated ahead of the step were
    # drawn; a checkpoint records it, so the resumed run draws (and samples) those batches again
    pending_sampler: Optional[SamplerState] = None

    def to_json(self) -> dict[str, Any]:
        """The plain part, as trainer_state.json holds it (plugin states are saved beside it)."""
        sampler = self.pending_sampler or self.sampler
        return {"step": self.step, "samples": self.samples_seen,
                "sampler": {"epoch": sampler.epoch, "index": sampler.index}}

    def load_json(self, saved: dict[str, Any]) -> None:
        self.step = int(saved["step"])
        self.samples_seen = int(saved["samples"])
        self.sampler.epoch = int(saved["sampler"]["epoch"])  # in place: the prompt sampler shares it
        self.sampler.index = int(saved["sampler"]["index"])


def stateful_plugins(normalizer: Any, reward_sources: list[Any]) -> dict[str, Any]:
    """The plugins whose state goes into checkpoints, by slot: those with
    :class:`~zenalign.plugins.Stateful` or :class:`~zenalign.plugins.StatefulDirectory`."""
    slots = {"normalizer": normalizer} | {f"rewards-{i}": source for i, source in enumerate(reward_sources)}
    return {slot: obj for slot, obj in slots.items() if isinstance(obj, (Stateful, StatefulDirectory))}
