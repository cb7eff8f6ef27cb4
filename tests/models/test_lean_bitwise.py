"""Issue 30, item 6: a step with no learning signal does not move the policy.

With every advantage 0, the loss is the KL term alone, and on the reference's own weights its k3
estimator and its gradient are exactly 0 only if the reference pass computes the update pass's
log-probs to the bit. Rounding-level differences (another product kernel in a no-grad pass)
gave a gradient of 4e-8 at step 1, which AdamW turns into a full-size step: KL 0.0025 by step 3.
So every pass that feeds the loss (the update's, with autograd; the reference's and pi_old's,
without) must run the same operations on equal weights.

The model here is one layer of the 135m shape (hidden 576, MLP 1536, 9 heads over 3): its
products are large enough that the no-grad pass's former weights-first MLP products rounded
differently from the update's, in float32 and under bf16 autocast.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers import EOS, PAD, REVERSE_POLICY, byte_tokenizer
from zenalign import GRPOTrainer
from zenalign.models.logprobs import update_pass_kind
from zenalign.generation.rollout import Rollout
from zenalign.models.lean import kernels, lean_model
from zenalign.models.lean import model as lean_lm
from zenalign.train.distributed import leave_process_group

PROMPTS = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in ["abc", "hello", "xyz", "kite", "moon", "tree"]]


def one_wide_layer(seed: int = 1) -> LlamaForCausalLM:
    """One decoder layer of SmolLM-135M's width over the 384-id byte vocabulary."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=384, hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=PAD,
        eos_token_id=EOS, bos_token_id=None))


def ragged_batch(prompts: int = 2, group_size: int = 8, prompt_length: int = 16,
                 completion_length: int = 32) -> Rollout:
    """Groups of random completions after left-padded prompts (another padding per group), every
    third completion ending early (EOS, then padding): 2 x 8 rows of 16 + 32 tokens by default."""
    g = torch.Generator().manual_seed(0)
    n, tp = prompts * group_size, prompt_length
    sequences = torch.randint(2, 384, (n, tp + completion_length), generator=g)
    attention = torch.ones_like(sequences)
    for p in range(prompts):
        rows, pad = slice(p * group_size, (p + 1) * group_size), 3 * p
        sequences[rows, :tp] = sequences[p * group_size, :tp]
        sequences[rows, :pad], attention[rows, :pad] = PAD, 0
    for row in range(0, n, 3):
        length = 1 + (7 * row) % (completion_length - 1)
        sequences[row, tp + length - 1] = EOS
        sequences[row, tp + length:], attention[row, tp + length:] = PAD, 0
    completion_mask = attention[:, tp:].clone()
    return Rollout(sequences, attention, tp, completion_mask, completion_mask[:, -1].bool(), [""] * n, [[]] * n)


def zero_reward(completions):
    return [0.0] * len(completions)


def trainer_for(tmp_path, model, **options) -> GRPOTrainer:
    return GRPOTrainer(model=model, tokenizer=byte_tokenizer(), reward_model=zero_reward, kl_coef=0.04,
                       learning_rate=1e-3, group_size=8, prompts_per_step=2, max_new_tokens=32, seed=0,
                       output_dir=str(tmp_path / "run"), progress_bar=False, **options)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("layers", ["lean-autograd", "lean-recomputing", "lora"])
def test_reference_and_old_policy_passes_equal_the_update_pass_to_the_bit(tmp_path, layers, precision, checkpointing,
                                                                          monkeypatch):
    """The passes as the run makes them (PolicyUpdate, the engine's autocast): the reference (a
    frozen copy of the policy, or with LoRA the policy itself with its adapters off: its B
    matrices start at zero, so the weights are equal) and pi_old's, both without autograd,
    against the update's pass with autograd. On the lean forward the layers run on plain
    autograd (this batch's 300k residual elements are below kernels.RECOMPUTE_FROM) or forced onto
    the halves that recompute (what the 135m shape runs); LoRA runs transformers' forward."""
    monkeypatch.setattr(kernels, "RECOMPUTE_FROM", 0 if layers == "lean-recomputing" else 1 << 62)
    gates, saves_less = [], kernels._saves_less
    monkeypatch.setattr(lean_lm, "_saves_less", lambda x, w: gates.append(saves_less(x, w)) or gates[-1])
    lora = {"lora": {"r": 4, "alpha": 8}} if layers == "lora" else {}
    trainer = trainer_for(tmp_path, one_wide_layer(), precision=precision, gradient_checkpointing=checkpointing, **lora)
    trainer.setup(PROMPTS)
    try:
        updater, policy, rollout = trainer.updater, trainer.engine.train_model, ragged_batch()
        reference = updater.reference_logprobs(rollout)                                      # (16, 32)
        old = updater.logprobs(policy, rollout)
        policy.train()
        update = updater.forward(policy, rollout, slice(0, len(rollout)))
        assert update.requires_grad
    finally:
        trainer.cleanup()
    assert torch.equal(reference, update.detach()) and torch.equal(old, update.detach())
    halves_ran = {"lean-autograd": {False}, "lean-recomputing": {True}, "lora": set()}  # LoRA: transformers' forward
    assert set(gates) == halves_ran[layers]


def test_under_ddp_the_reference_runs_the_forward_the_update_runs(tmp_path):
    """Under DistributedDataParallel the update's pass runs transformers' forward (the lean forward
    covers one process); the reference, a plain module, took the lean forward and so other
    kernels. Here a one-process gloo group stands in for torchrun."""
    trainer = trainer_for(tmp_path, one_wide_layer())
    trainer.setup(PROMPTS)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        trainer.engine.train_model = torch.nn.parallel.DistributedDataParallel(trainer.engine.model)
        updater, rollout = trainer.updater, ragged_batch()
        assert update_pass_kind(trainer.engine.train_model, True, True) == (False, True)
        assert update_pass_kind(trainer.engine.model, True, True) == (True, True)
        reference = updater.reference_logprobs(rollout)
        trainer.engine.train_model.train()
        update = updater.forward(trainer.engine.train_model, rollout, slice(0, len(rollout)))
    finally:
        trainer.engine.train_model = trainer.engine.model  # DDP holds the group: released before it is destroyed
        leave_process_group()
        trainer.cleanup()
    assert torch.equal(reference, update.detach())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_first_step_with_zero_advantages_has_zero_kl_and_zero_gradient(tmp_path, precision):
    """Step 1 of a run on the lean forward whose rewards are all 0: the reference is the policy's
    frozen copy, so the KL and its gradient, the whole loss here, are exactly 0."""
    trainer = trainer_for(tmp_path, one_wide_layer(), precision=precision, steps=1, eval_interval=0)
    trainer.train(PROMPTS[:2], PROMPTS[:1])
    assert lean_model(trainer.model) is not None  # the run was on the lean forward
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert (metrics["kl"], metrics["grad_norm"]) == (0.0, 0.0)


def test_ten_steps_with_zero_rewards_leave_the_policy_unchanged(tmp_path):
    """The quickstart's policy and shape, every reward 0, KL coefficient 0.04, lr 1e-3: AdamW makes
    a full-size step out of any non-zero gradient, however small, so the weights stay equal to
    the bit only if every gradient is exactly 0. weight_decay 0 (the schema's default, set here
    so that the test does not depend on it): decoupled decay would shrink the weights anyway."""
    trainer = GRPOTrainer(model=str(REVERSE_POLICY), reward_model=zero_reward, kl_coef=0.04, learning_rate=1e-3,
                          weight_decay=0.0, group_size=8, prompts_per_step=8, max_new_tokens=8, steps=10,
                          eval_interval=0, seed=0, output_dir=str(tmp_path / "run"), progress_bar=False)
    trainer.train(PROMPTS, PROMPTS[:2])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11)) and {m["kl"] for m in metrics} == {0.0}
    initial, final = AutoModelForCausalLM.from_pretrained(REVERSE_POLICY).state_dict(), trainer.model.state_dict()
    assert initial.keys() == final.keys()
    moved = [name for name in initial if not torch.equal(initial[name], final[name])]
    assert not moved, moved
