"""The engines (zenalign.train.engine) built from the recipe's typed sections, checked by hand:
AdamW's first step, the warm-up schedule, clipping, the learning rate a resume continues with,
and the DeepSpeed config."""

from __future__ import annotations

import math

import pytest
import torch

from zenalign.recipe.schema import EngineSection, GRPOSection
from zenalign.train.distributed import Dist
from zenalign.train.engine import TorchEngine, create_engine, deepspeed_config, lr_lambda


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))


def engine_for(optim: GRPOSection, settings: EngineSection = EngineSection(), steps: int = 10) -> TorchEngine:
    engine = create_engine(settings, optim, Dist(), torch.device("cpu"), local_batch=4)
    engine.attach(Scalar(), optimizer_steps=steps, micro_batches=1)
    return engine


def test_the_first_adamw_step_moves_each_weight_by_the_learning_rate_against_its_gradient():
    """Adam's first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected to g and g^2, so the step is
    lr * g / (|g| + eps) = lr * sign(g) (eps 1e-8); weight decay 0."""
    engine = engine_for(GRPOSection(learning_rate=0.1, weight_decay=0.0))
    assert isinstance(engine, TorchEngine) and engine.learning_rate == 0.1
    engine.model.w.grad = torch.tensor([3.0, -4.0])
    norm = engine.optimizer_step()
    assert norm == pytest.approx(5.0)  # the norm before clipping: sqrt(9 + 16)
    torch.testing.assert_close(engine.model.w.detach(), torch.tensor([0.9, -1.9]), atol=1e-6, rtol=0)
    assert engine.optimizer_steps == 1 and engine.model.w.grad is None


def test_the_warmup_schedule_and_a_nonfinite_gradient_that_steps_nothing():
    engine = engine_for(GRPOSection(learning_rate=0.2, warmup_steps=4, lr_schedule="constant"))
    assert engine.learning_rate == pytest.approx(0.2 * 1 / 4)  # step 0 of the warm-up: (0 + 1) / 4
    engine.model.w.grad = torch.tensor([1.0, 1.0])
    engine.optimizer_step()
    assert engine.learning_rate == pytest.approx(0.2 * 2 / 4)
    before = engine.model.w.detach().clone()
    engine.model.w.grad = torch.tensor([float("nan"), 1.0])
    assert math.isnan(engine.optimizer_step())
    assert torch.equal(engine.model.w.detach(), before) and engine.optimizer_steps == 1  # not stepped, not counted
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5) and lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)


def test_max_grad_norm_clips_the_step_but_the_reported_norm_is_the_raw_one():
    """SGD-like check through Adam is blind to scale, so read the clipped gradient Adam saw:
    with max_grad_norm 1 and g = (3, -4), Adam's first moment holds (1-b1) * (0.6, -0.8)."""
    engine = engine_for(GRPOSection(learning_rate=0.1, weight_decay=0.0), EngineSection(max_grad_norm=1.0))
    engine.model.w.grad = torch.tensor([3.0, -4.0])
    assert engine.optimizer_step() == pytest.approx(5.0)
    moment = engine.optimizer.state[engine.model.w]["exp_avg"]
    torch.testing.assert_close(moment, 0.1 * torch.tensor([0.6, -0.8]), atol=1e-6, rtol=0)


def test_a_resume_continues_the_schedule_with_the_recipes_learning_rate(tmp_path):
    first = engine_for(GRPOSection(learning_rate=0.1, warmup_steps=4))
    first.model.w.grad = torch.tensor([1.0, 1.0])
    first.optimizer_step()
    first.save_state(tmp_path / "state")
    resumed = engine_for(GRPOSection(learning_rate=0.4, warmup_steps=4))
    resumed.load_state(tmp_path / "state")
    assert resumed.optimizer_steps == 1
    assert resumed.learning_rate == pytest.approx(0.4 * 2 / 4)  # the new peak, from the saved step


def test_the_deepspeed_config_comes_from_the_engine_and_grpo_sections():
    settings = EngineSection(backend="deepspeed", zero_stage=2, max_grad_norm=0.5, precision="bf16",
                             offload_optimizer=True, deepspeed_config={"zero_optimization": {"overlap_comm": True}})
    config = deepspeed_config(settings, GRPOSection(learning_rate=3e-6, adam_betas=(0.9, 0.95), weight_decay=0.1),
                              micro_batch_size=4, micro_batches=3)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                           "overlap_comm": True}
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-6, "betas": [0.9, 0.95], "eps": 1e-8,
                                                              "weight_decay": 0.1}}  # CPU Adam: no torch_adam key
