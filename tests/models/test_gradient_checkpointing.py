"""engine.gradient_checkpointing: the same log-probs and gradients, with fewer activations kept
for backward (counted exactly with autograd's saved-tensor hooks), on the lean forward and on
transformers' forward, and end to end on both engines."""

import json

import pytest
import torch

from helpers import RECIPES, build_tiny_llama, ragged_rollout, run_cli
from zenalign.grpo.logprobs import completion_logprobs
from zenalign.models import lean as lean_module


def saved_bytes_and_grads(model, rollout, lean: bool):
    """The bytes autograd keeps for backward during the log-prob pass, the log-probs, and every
    parameter's gradient of a loss that weighs each token differently."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, 0.7, lean=lean)
    weights = torch.linspace(0.5, 2.0, logp.numel()).reshape(logp.shape) * rollout.completion_mask
    (logp * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return sum(saved), logp.detach(), grads


@pytest.mark.parametrize("lean, halves", [(True, False), (True, True), (False, False)],
                         ids=["lean", "lean-recomputing-halves", "transformers"])
def test_checkpointing_keeps_the_gradients_and_saves_fewer_activations(lean, halves, monkeypatch):
    """With the recomputing layer halves too (which the 135m shape runs): under checkpointing the
    MLP half's backward writes its gradient over a gate/up product that checkpointing recomputed."""
    monkeypatch.setattr(lean_module, "RECOMPUTE_FROM", 0 if halves else 1 << 62)
    model = build_tiny_llama(layers=4, hidden=64).train()
    rollout = ragged_rollout(model)
    plain_bytes, plain_logp, plain_grads = saved_bytes_and_grads(model, rollout, lean)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt_bytes, ckpt_logp, ckpt_grads = saved_bytes_and_grads(model, rollout, lean)
    # On transformers' forward, checkpointing also turns off the shared prompt pass (transformers
    # drops the KV cache it needs), so each row runs its prompt: sums in another order, 1e-5.
    exact = 0 if lean else 1e-5
    torch.testing.assert_close(ckpt_logp, plain_logp, rtol=exact, atol=exact)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-5, atol=1e-5)
    # 4 layers: each keeps only its input (plus what the head needs) instead of all its intermediates
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("engine", [[], ["engine.backend=deepspeed", "engine.zero_stage=2"]], ids=["torch", "zero2"])
def test_a_run_with_checkpointing_matches_one_without(tmp_path, engine):
    args = [str(RECIPES / "quickstart.yaml"), "run.steps=3", "run.eval_interval=0", "data.eval_size=8", "-q", *engine]
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        done = run_cli("run", *args, f"engine.gradient_checkpointing={flag}", f"run.output_dir={out}")
        assert done.returncode == 0, done.stderr
        runs[flag] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for plain, ckpt in zip(runs["false"], runs["true"], strict=True):
        assert plain["reward_mean"] == ckpt["reward_mean"]
        for key in ("loss", "kl", "grad_norm"):
            assert ckpt[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-8), key
