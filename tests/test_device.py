"""The parts of a step whose code takes another branch on a GPU, each checked on the CPU here and on
CUDA under the gpu marker (skipped without a GPU; bench/gpu_check.py runs ``pytest -m gpu``): the
lean forward against transformers', the Gumbel sampler (batch invariance, no host-device sync
while decoding, its distribution), the chunked log-probs at a real vocabulary, the update's
gradient against the plain reference (tests/test_bench.py), and a short run's determinism. The
helpers are the CPU tests'; the device is a parameter."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from helpers import (DEVICES, EOS, PROMPTS, assert_draws_follow, assert_lean_bf16_as_close_as_transformers, build_tiny_causal_lm, byte_tokenizer,
                      logprobs_and_grads, ragged_rollout, run_cli, saved_bytes)
from zenalign.grpo import gumbel
from zenalign.grpo import logprobs as lp
from zenalign.grpo.gumbel import GumbelSampler, completion_keys
from zenalign.grpo.rollout import decode_groups, rollout_from
from zenalign.models import lean as lean_module
from zenalign.models import primitives

V_REAL = 151_936  # Qwen2's vocabulary


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def tiny_on(device: torch.device, arch: str = "qwen2", checkpointing: bool = False, **overrides):
    model = build_tiny_causal_lm(arch, seed=3, **overrides).to(device)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


# ------------------------------------------------------------------------------------- lean forward

@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_forward_equals_transformers_in_fp32(device, arch, checkpointing):
    """Log-probs and every parameter's gradient, the lean pass (shared prompts) against
    transformers' forward (SDPA), within the CPU tests' fp32 tolerance (tests/models/test_fastpath.py)."""
    model = tiny_on(device, arch, checkpointing)
    rollout = ragged_rollout(model)
    assert rollout.sequences.device.type == device.type
    plain, plain_grads = logprobs_and_grads(model, rollout, slice(0, 12), lean=False, share=False)
    lean, lean_grads = logprobs_and_grads(model, rollout, slice(0, 12), lean=True, share=True)
    torch.testing.assert_close(lean, plain, rtol=0, atol=2e-5)
    assert lean_grads.keys() == plain_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_lean_forward_under_bf16_autocast_is_as_close_to_fp32_as_transformers(device, checkpointing):
    """Under bf16 autocast neither forward equals fp32. The stated tolerance: the lean pass's
    largest log-prob error is at most twice transformers' bf16 error + 1e-3, and its gradients'
    largest relative error likewise (the CPU test's bound)."""
    model = tiny_on(device, "qwen2", checkpointing)
    rollout = ragged_rollout(model)
    rows = slice(0, 12)
    assert_lean_bf16_as_close_as_transformers(model, rollout, rows)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lean_attention_runs_sdpas_fused_kernels_on_cuda(precision):
    """With SDPA restricted to its flash and memory-efficient kernels, the lean update pass and a
    decode run: none of their attention calls falls back to the math kernel (which a masked call
    with enable_gqa would need)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_on(torch.device("cuda"), "qwen2")  # 4 query heads over 2 key/value heads
    rollout = ragged_rollout(model)
    lean_module.lean_model(model).checked = True  # its first-use check runs transformers' attention, not tested here
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), \
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logp = lp.completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, lean=True)
        logp.sum().backward()
        decoded = decode_tiny(model, lean=True)
    assert decoded.shape[0] == 12 and torch.isfinite(logp).all()


# ------------------------------------------------------------------------------------------ sampler

def decode_tiny(model, lean: bool = True, new_tokens: int = 9, processors=None):
    """4 completions of each of PROMPTS decoded on the model's device with the keyed sampler."""
    encoded = byte_tokenizer()(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    keys = completion_keys(seed=3, step=1, first_completion=0, count=12).to(device)
    processors = processors or [GumbelSampler(keys, ids.shape[1], 1.0)]
    model.eval()
    with torch.inference_mode():
        return decode_groups(model, ids, mask, 4, new_tokens, [EOS], 0, processors, lean=lean)


@pytest.mark.parametrize("vocab", [384, V_REAL], ids=["every-id-its-noise", "candidates-and-tail"])
def test_a_row_alone_draws_what_it_draws_in_a_batch(device, vocab):
    """The keyed sampler's ids do not depend on the batch: each of 32 rows drawn alone gives
    the id it gets in the batch, in the full Gumbel-max path and in the candidates-and-tail path
    (logits spread so that the tail can win in some rows and not in others)."""
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(32, vocab, generator=generator) * 3.0).to(device)
    keys = completion_keys(seed=5, step=2, first_completion=0, count=32).to(device)
    ids = torch.zeros(32, 7, dtype=torch.long, device=device)
    batch = GumbelSampler(keys, 3, 1.0).choose(ids, logits)
    alone = torch.cat([GumbelSampler(keys[i:i + 1], 3, 1.0).choose(ids[i:i + 1], logits[i:i + 1]) for i in range(32)])
    assert torch.equal(alone, batch)


def test_the_tail_in_every_row_draws_the_ids_of_the_open_rows_path(device, monkeypatch):
    """On a GPU the sampler works out the tail in every row (no nonzero, no shape that depends on
    the data); per row it is the same computation as the CPU's path over the open rows, so the
    ids are the same, on flat logits (the tail wins often), peaked ones (never) and in between."""
    keys = completion_keys(seed=1, step=3, first_completion=0, count=64).to(device)
    ids = torch.zeros(64, 5, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(2)
    for spread in (0.05, 3.0, 30.0):
        logits = (torch.randn(64, 9_000, generator=generator) * spread).to(device)
        chosen = {}
        for every_row in (False, True):
            monkeypatch.setattr(gumbel, "_waits_for_device", lambda scores, every_row=every_row: every_row)
            chosen[every_row] = GumbelSampler(keys, 2, 1.0).choose(ids, logits)
        assert torch.equal(chosen[True], chosen[False]), spread


@pytest.mark.parametrize("path", ["every-id-its-noise", "candidates-and-tail"])
def test_the_sampler_draws_from_softmax_on_the_device(device, path):
    """20,000 draws from one row of logits repeated, made on the device, pass the chi-square test
    against softmax (tests/generation/test_sampling.py's check): at 384 ids with every id's own noise, and at
    2,048 ids through the candidates and the tail (8 candidates, the tail holding most of the mass)."""
    n, vocab = 20_000, 384 if path == "every-id-its-noise" else 2048
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(6)) * 0.5
    keys = completion_keys(seed=9, step=1, first_completion=0, count=n).to(device)
    options = {} if path == "every-id-its-noise" else {"candidates": 8, "full_vocab": 0}
    sampler = GumbelSampler(keys, 0, 1.0, **options)
    draws = sampler.choose(torch.zeros(n, 1, dtype=torch.long, device=device), row.to(device).expand(n, -1))
    assert draws.device.type == device.type
    assert_draws_follow(draws, torch.softmax(row.double(), -1))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_decode_loop_never_waits_for_the_gpu(precision, monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") around the token loop of a lean decode over
    Qwen2's 151,936 ids (so the sampler's candidates-and-tail path runs): any host-device sync
    in the loop (``.item()``, ``nonzero``, a blocking copy, reading the end-of-rows flag) raises."""
    model = tiny_on(torch.device("cuda"), "qwen2", vocab_size=V_REAL)
    real_loop = lean_module.sample_loop
    runs = []

    def loop_without_syncs(*args, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_loop(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            runs.append(True)

    monkeypatch.setattr(lean_module, "sample_loop", loop_without_syncs)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = decode_tiny(model, new_tokens=12)
    assert runs and out.shape[0] == 12


def test_the_kv_cache_is_bf16_on_a_gpu_and_float32_on_a_cpu_under_autocast(device, monkeypatch):
    """Decoding under bf16 autocast: the cache that single-query attention reads holds float32 on
    a CPU (its attention runs in float32) and bf16 on a GPU (what its kernel reads)."""
    model = tiny_on(device, "qwen2")
    seen, real = [], lean_module.LeanLM.attend_one
    monkeypatch.setattr(lean_module.LeanLM, "attend_one", lambda self, q, k, v, bias: seen.append(k.dtype) or
                        real(self, q, k, v, bias))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        decode_tiny(model, new_tokens=3)
    assert seen and set(seen) == {torch.float32 if device.type == "cpu" else torch.bfloat16}


def test_stopping_a_few_tokens_late_changes_no_completion(device, monkeypatch):
    """On a GPU the decode loop learns that every row has ended a token or two late
    (primitives.RowsEnded). Never stopping early at all, the extra steps are padding in every
    row, and the rollout (trimmed) is the same."""
    model = tiny_on(device, "llama")

    def eos_at_third(tokens, scores):  # every row ends at its third token
        if tokens.shape[1] - prompt_length == 2:
            scores = torch.full_like(scores, -1e9)
            scores[:, EOS] = 0.0
        return scores

    encoded = byte_tokenizer()(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    prompt_length = encoded["input_ids"].shape[1]
    keys = completion_keys(seed=3, step=1, first_completion=0, count=12).to(device)
    rollouts = {}
    for late in (False, True):
        if late:
            monkeypatch.setattr(primitives.RowsEnded, "__call__", lambda self, unfinished: False)
        sampler = GumbelSampler(keys, prompt_length, 1.0)
        out = decode_tiny(model, new_tokens=9, processors=lambda t, s: eos_at_third(t, sampler(t, s)))
        mask = (out[:, :prompt_length] != 0).long()  # PROMPTS hold no padding id
        rollouts[late] = (out, rollout_from(out, mask, [EOS], byte_tokenizer()))
    assert rollouts[False][0].shape[1] == prompt_length + 3 and rollouts[True][0].shape[1] == prompt_length + 9
    early, late = rollouts[False][1], rollouts[True][1]
    assert torch.equal(early.sequences, late.sequences) and early.completions == late.completions


# ----------------------------------------------------------------------------------- chunked log-probs

def chunked_pass(hidden, head, targets):
    """Log-probs of the chunked head, forward and backward (hidden's and the head's gradients)."""
    hidden.grad = head.weight.grad = None
    logp = lp.chunked_token_logprobs(hidden, head, targets, 1.0, False, head.out_features)
    (logp * torch.linspace(0.5, 2.0, logp.numel(), device=logp.device).view_as(logp)).sum().backward()
    return logp.detach(), hidden.grad.clone(), head.weight.grad.clone()


def test_chunked_log_probs_at_a_real_vocabulary_equal_the_plain_ones_in_bounded_memory(device):
    """V = 151,936 and 512 positions: the chunked head's log-probs and gradients equal autograd
    through the full logits and log_softmax; what it keeps does not grow with T x V (the full fp32
    logits alone are 311 MB here): on a CPU what autograd saves is the hidden states and two
    numbers a position; on a GPU the peak memory at 512 positions is within 8 MB of the peak at 256
    (the logits of the extra 256 positions are 156 MB)."""
    torch.manual_seed(0)
    hidden_size = 64
    head = torch.nn.Linear(hidden_size, V_REAL, bias=False).to(device)
    hidden = torch.randn(1, 512, hidden_size, device=device, requires_grad=True)
    targets = torch.randint(0, V_REAL, (1, 512), device=device)
    got = chunked_pass(hidden, head, targets)
    hidden.grad = head.weight.grad = None
    plain = lp._token_logprobs(head(hidden), targets, 1.0)
    (plain * torch.linspace(0.5, 2.0, plain.numel(), device=device).view_as(plain)).sum().backward()
    torch.testing.assert_close(got[0], plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], head.weight.grad, rtol=1e-4, atol=1e-7)
    del plain
    if device.type == "cpu":
        kept, _ = saved_bytes(lambda: lp.chunked_token_logprobs(hidden, head, targets, 1.0, False, V_REAL))
        assert kept <= 512 * (4 * hidden_size + 16)  # hidden states, log-normalisers, targets: no V in it
        return
    peaks = {}
    for length in (256, 512):
        h = hidden[:, :length].detach().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        chunked_pass(h, head, targets[:, :length])
        torch.cuda.synchronize()
        peaks[length] = torch.cuda.max_memory_allocated() - base
    assert peaks[512] - peaks[256] <= 8 << 20, peaks
    assert peaks[512] < 0.5 * 512 * V_REAL * 4, peaks  # below the full logits of the pass


# ------------------------------------------------------------------------------------ determinism

@pytest.mark.slow
def test_a_short_run_repeats_itself_with_the_same_seed(device, tmp_path):
    """The quickstart's first 3 steps, twice, on the device. On a CPU every metrics.jsonl column
    but the wall-clock ones is identical. On a GPU the update's backward sums some gradients with
    atomic adds (the shared prompt's keys and values gathered out to the group's rows: index_select's
    backward), so its float sums can differ in their last bits between runs: there the columns
    that follow from the sampled tokens (rewards, lengths, counts) must be identical and the
    reductions within the quickstart fixture's tolerances (tests/test_quickstart_metrics.py:
    relative 1e-5 on loss, KL and ratio, 1e-4 on the gradient norm)."""
    from test_quickstart_metrics import REDUCTIONS, wall_clock

    runs = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        done = run_cli("run", "recipes/quickstart.yaml", "run.steps=3", "run.eval_interval=0",
                       f"engine.device={device.type}", f"run.output_dir={out}", "-q")
        assert done.returncode == 0, done.stderr[-2000:]
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        runs.append([{k: v for k, v in json.loads(line).items() if not wall_clock(k)} for line in lines])
    first, second = runs
    assert len(first) == len(second) == 3
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for column, value in a.items():
            if device.type == "cuda" and column in REDUCTIONS and value is not None:
                assert math.isclose(b[column], value, rel_tol=REDUCTIONS[column], abs_tol=1e-9), (a["step"], column)
            else:
                assert b[column] == value, (a["step"], column, b[column], value)


# ----------------------------------------------------------------------- precision and DeepSpeed

def test_fp32_on_a_gpu_with_tf32_turned_on_is_warned_about(caplog, monkeypatch):
    """engine.precision fp32 means float32 products: a process that turned TF32 on hears so once
    (checked on the CPU by flipping the flag; it touches no kernel here)."""
    from zenalign.train import engine

    caplog.set_level(logging.WARNING, logger="zenalign")
    monkeypatch.setattr(engine, "cuda_matmuls_use_tf32", lambda: False)
    engine.check_fp32_matmuls(torch.device("cuda"), "fp32")
    assert not caplog.records
    monkeypatch.setattr(engine, "cuda_matmuls_use_tf32", lambda: True)
    engine.check_fp32_matmuls(torch.device("cpu"), "fp32")
    engine.check_fp32_matmuls(torch.device("cuda"), "bf16")
    assert not caplog.records
    engine.check_fp32_matmuls(torch.device("cuda", 0), "fp32")
    assert len(caplog.records) == 1 and "TF32" in caplog.records[0].getMessage()


def test_deepspeeds_accelerator_follows_the_runs_device(monkeypatch):
    """DeepSpeed's accelerator is the run's device, not DeepSpeed's guess (CUDA wherever a GPU is
    visible): DS_ACCELERATOR is set from engine.device when unset, and a DeepSpeed that picked
    another accelerator is one line naming both."""
    from zenalign.errors import RecipeError
    from zenalign.train.distributed import check_deepspeed_accelerator, prepare_deepspeed_env

    for device_type, expected in (("cuda", "cuda"), ("cpu", "cpu")):
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        prepare_deepspeed_env(device_type)
        assert __import__("os").environ["DS_ACCELERATOR"] == expected
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.accelerator

    class Accelerator:
        def device_name(self):
            return "cpu"

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    check_deepspeed_accelerator("cpu")
    with pytest.raises(RecipeError, match=r"DeepSpeed's accelerator is 'cpu' but engine.device is 'cuda'"):
        check_deepspeed_accelerator("cuda")
