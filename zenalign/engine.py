"""What runs the update, behind one small interface: ``backward(loss)``, ``step()``,
``autocast()``, ``state_dict()``.

The torch engine is plain AdamW with gradient clipping and a warm-up/decay schedule, for a laptop
CPU or one GPU.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak learning rate at optimizer step ``s`` (0-based)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return factor


class TorchEngine:
    """AdamW on a single process (CPU or one GPU)."""

    def __init__(self, model: torch.nn.Module, grpo: Any, engine: Any, total_optimizer_steps: int, device: torch.device):
        self.model = model.to(device)
        self.device = device
        self.max_grad_norm = engine.max_grad_norm
        self.precision = engine.precision
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=grpo.learning_rate, betas=tuple(grpo.adam_betas), weight_decay=grpo.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(grpo.lr_schedule, grpo.warmup_steps, total_optimizer_steps)
        )

    def autocast(self):
        """bf16 autocast for forward passes when ``engine.precision`` is bf16."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, clear gradients. Returns the grad norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])) if params else torch.tensor(0.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
