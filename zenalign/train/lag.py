"""Pipelined training with a fixed lag (``sampling.lag: L``): which policy samples which step.

Versions count training steps: version v is the policy after step v (version 0: the policy the run
started from, or resumed). Step n trains on a batch sampled by version ``max(0, n - 1 - L)``, so
with L = 0 every step samples with the policy it updates (on-policy, today's behaviour), and with
L >= 1 step n + 1's batch is drawn and sent to the sampler during step n, before step n's update
(version n - L by then), and generated while that update runs. Refill rounds of a filter (DAPO's
dynamic sampling) come from the same version as their step's first round.

The lag is fixed, so a run is a function of its seed and recipe: each batch's prompts are drawn in
the same order as on-policy, its keys are the step's, and its weights are a known version. The
versions still needed are kept as CPU copies (:class:`PolicyVersions`) and go into every
checkpoint (``lagged/v00000041.safetensors``), so a resumed run regenerates the pending batches
from their keys with the weights that first generated them (the checkpoint's sampler position is
the one before those batches were drawn: :attr:`TrainState.pending_sampler`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zenalign.errors import ModelLoadError

FOLDER = "lagged"


def sampling_version(step: int, lag: int) -> int:
    """The policy version that samples step ``step``'s batch (steps count from 1)."""
    return max(0, step - 1 - lag)


class PolicyVersions:
    """CPU copies of the recent policy versions the lagged sampler still needs (at most ``lag``)."""

    def __init__(self, lag: int, weights: Callable[[], dict[str, torch.Tensor]]):
        self.lag = lag
        self.weights = weights  # the live policy's weights as the sampler loads them, copied to the CPU
        self.kept: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(self, step: int) -> None:
        """During step ``step``, before its update: keep the live policy (version ``step - 1``)."""
        self.kept.setdefault(step - 1, self.weights())

    def prune(self, step: int) -> None:
        """Once step ``step``'s batch is collected and the next one started: drop the versions no later
        step samples with. Not before: a step whose collection fails (a generation server lost) is drawn
        again, and the checkpoint of step ``step - 1`` then written still needs its version."""
        oldest = sampling_version(step + 1, self.lag)
        for version in [v for v in self.kept if v < oldest]:
            del self.kept[version]

    def of(self, version: int, live: int) -> Optional[dict[str, torch.Tensor]]:
        """The weights of ``version``: None when it is the live policy's (version ``live``)."""
        if version == live:
            return None
        if version not in self.kept:
            raise RuntimeError(f"sampling.lag: policy version {version} is needed but not kept (kept: {sorted(self.kept)})")
        return self.kept[version]

    def save(self, directory: Path, step: int) -> None:
        """The versions a run resumed at ``step`` samples with (those before it), as safetensors files."""
        for version, weights in sorted(self.kept.items()):
            if sampling_version(step + 1, self.lag) <= version < step:
                directory.mkdir(parents=True, exist_ok=True)
                unique, aliases, first = {}, {}, {}
                for name, tensor in weights.items():  # a tied LM head is the embedding's tensor: stored once
                    if tensor.data_ptr() in first:
                        aliases[name] = first[tensor.data_ptr()]
                    else:
                        first[tensor.data_ptr()], unique[name] = name, tensor.contiguous()
                save_file(unique, str(directory / f"v{version:08d}.safetensors"), metadata={"aliases": json.dumps(aliases)})

    def load(self, directory: Path, step: int, read: Callable[[Path], dict[str, torch.Tensor]]) -> None:
        """What :meth:`save` wrote at ``step``; a checkpoint without them (written with another lag) is refused."""
        self.kept = {int(path.stem[1:]): with_aliases(path, read(path)) for path in sorted(directory.glob("v*.safetensors"))}
        needed = [v for v in range(sampling_version(step + 1, self.lag), step) if v not in self.kept]
        if needed:
            raise ModelLoadError(f"--resume: checkpoint '{directory.parent}' holds no weights for policy version "
                                 f"{needed[0]}, which sampling.lag {self.lag} samples the next step with; resume with "
                                 f"the lag the run was written with")


def with_aliases(path: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved version's tensors with the names that share one (a tied LM head) put back."""
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    return weights | {name: weights[target] for name, target in aliases.items()}

