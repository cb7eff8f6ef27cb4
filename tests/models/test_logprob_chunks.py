"""Log-probs a chunk of positions at a time (zenalign.grpo.logprobs.chunked_token_logprobs): the
same values, entropies and gradients as the plain computation, while autograd keeps only the
chunks' hidden states instead of every logit."""

import math

import pytest
import torch

from helpers import build_tiny_llama, ragged_rollout, saved_bytes
from zenalign.grpo import logprobs as lp


def plain_and_chunked(linear, hidden, targets, temperature, entropy, budget, weights):
    """(saved bytes, log-probs, entropies, hidden's gradient, ``linear``'s gradients) for the plain
    computation (``budget`` None) and for chunked_token_logprobs with ``linear`` as the head."""
    hidden.grad = None
    for p in linear.parameters():
        p.grad = None
    vocab = linear.out_features
    if budget is None:
        kept, out = saved_bytes(lambda: lp._token_logprobs(linear(hidden), targets, temperature, entropy))
    else:
        kept, out = saved_bytes(lambda: lp.chunked_token_logprobs(hidden, linear, targets, temperature, entropy, vocab, budget))
    logp = out[0] if entropy else out
    (logp * weights).sum().backward()
    grads = [p.grad.clone() for p in linear.parameters()]
    return kept, logp.detach(), out[1] if entropy else None, hidden.grad.clone(), grads


@pytest.mark.parametrize("entropy", [False, True], ids=["log-probs", "with-entropy"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_chunks_give_the_plain_values_and_gradients_and_keep_no_logits(entropy, bias, monkeypatch):
    """The head as _LinearLogProbs, whole and 5 positions a chunk, log-softmaxed whole and 2 rows
    at a time, equals autograd through log_softmax and gather."""
    torch.manual_seed(0)
    n, tc, hidden_size, vocab = 3, 37, 16, 500
    hidden = torch.randn(n, tc, hidden_size, requires_grad=True)
    linear = torch.nn.Linear(hidden_size, vocab, bias=bias)
    targets = torch.randint(0, vocab, (n, tc))
    weights = torch.linspace(-0.5, 2.0, n * tc).reshape(n, tc)
    plain = plain_and_chunked(linear, hidden, targets, 0.7, entropy, None, weights)
    logits_bytes = n * tc * vocab * 4
    assert plain[0] > logits_bytes  # autograd keeps the (N, Tc, V) log-softmax for backward
    for budget, block in ((n * tc * vocab, lp.SOFTMAX_BLOCK), (n * 5 * vocab, lp.SOFTMAX_BLOCK), (n * 5 * vocab, 2 * vocab)):
        monkeypatch.setattr(lp, "SOFTMAX_BLOCK", block)
        got = plain_and_chunked(linear, hidden, targets, 0.7, entropy, budget, weights)
        for a, b in zip(plain[1:], got[1:]):
            if isinstance(a, list):
                for x, y in zip(a, b):
                    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
            elif a is not None:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert got[0] < 0.1 * logits_bytes, budget  # only the hidden states and per-position numbers
        assert got[2] is None or not got[2].requires_grad  # the entropy comes without gradient


def test_the_linear_head_gradient_is_softmax_minus_one_hot_over_temperature():
    """By hand, on one position over a 3-id vocabulary: z = h W^T = (1, 2, 0) at T = 2 gives
    p = softmax(z / 2) and d logp_y / dz = (onehot(y) - p) / 2 for target y = 1."""
    hidden = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    linear = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 5.0], [2.0, 5.0], [0.0, 5.0]]))
    logp = lp.chunked_token_logprobs(hidden, linear, torch.tensor([[1]]), 2.0, False, 3)
    e = [math.exp(0.5), math.exp(1.0), 1.0]
    p = [v / sum(e) for v in e]
    assert float(logp.detach()) == pytest.approx(math.log(p[1]), abs=1e-6)
    logp.sum().backward()
    dz = [(0.0 - p[0]) / 2, (1.0 - p[1]) / 2, (0.0 - p[2]) / 2]
    expected = [[dz[v] * 1.0, dz[v] * 0.0] for v in range(3)]  # dL/dW_v = dz_v * h
    torch.testing.assert_close(linear.weight.grad, torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden.grad[0, 0], torch.tensor([sum(dz[v] * linear.weight[v, i].item() for v in range(3))
                                                                for i in range(2)]), rtol=0, atol=1e-6)


def test_the_linear_head_under_bf16_autocast_is_as_close_as_autograds():
    """Under bf16 autocast the product runs in bf16 as F.linear's would: the fused pass is as
    close to float32 as autograd through the autocast head."""
    torch.manual_seed(0)
    n, tc, hidden_size, vocab = 2, 9, 16, 500
    hidden = torch.randn(n, tc, hidden_size, requires_grad=True)
    linear = torch.nn.Linear(hidden_size, vocab, bias=False)
    targets = torch.randint(0, vocab, (n, tc))
    weights = torch.ones(n, tc)
    exact = plain_and_chunked(linear, hidden, targets, 1.0, False, None, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = plain_and_chunked(linear, hidden, targets, 1.0, False, None, weights)
        fused = plain_and_chunked(linear, hidden, targets, 1.0, False, n * 3 * vocab, weights)
    for i in (1, 3):
        low_err, fused_err = float((low[i] - exact[i]).abs().max()), float((fused[i] - exact[i]).abs().max())
        assert 0 < fused_err <= 1.5 * low_err + 1e-4, (i, fused_err, low_err)
    w_low = float((low[4][0] - exact[4][0]).norm() / exact[4][0].norm())
    w_fused = float((fused[4][0] - exact[4][0]).norm() / exact[4][0].norm())
    assert w_fused <= 1.5 * w_low + 1e-4, (w_fused, w_low)


def spy_on_chunks(monkeypatch, chunks: list) -> None:
    """Record the rows of every chunk of logits _LinearLogProbs computes (forward, then backward's
    recomputation)."""
    real = lp._logits_into
    monkeypatch.setattr(lp, "_logits_into", lambda buffer, hidden, *a: chunks.append(hidden.shape[0]) or
                        real(buffer, hidden, *a))


def chunk_rows(total: int, rows: int) -> list:
    return [rows] * (total // rows) + [total % rows] * bool(total % rows)


def test_the_lean_pass_chunks_its_logits_with_the_same_result(monkeypatch):
    model = build_tiny_llama(layers=2, hidden=32).train()
    rollout = ragged_rollout(model)
    outputs, chunks = {}, []
    spy_on_chunks(monkeypatch, chunks)
    for budget in (lp.LOGIT_CHUNK, 7 * 384):  # the default (one chunk here), then 7 positions a chunk
        monkeypatch.setattr(lp, "LOGIT_CHUNK", budget)
        model.zero_grad(set_to_none=True)
        logp = lp.completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, 0.7,
                                      lean=True)
        (logp * rollout.completion_mask).sum().backward()
        outputs[budget] = (logp.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    positions = logp.numel()
    assert positions == 12 * (rollout.sequences.shape[1] - rollout.prompt_length) and positions % 7
    # forward and backward: one chunk of every position, then 7 at a time (the last chunk shorter)
    assert chunks == [positions] * 2 + chunk_rows(positions, 7) * 2
    (a, grads_a), (b, grads_b) = outputs.values()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)


def tiny_gpt2():
    """A real GPT-2 (not a lean-forward architecture) over the byte vocabulary, without dropout
    (two passes in training mode must see the same function)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=384, n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0,
                                      pad_token_id=0, eos_token_id=2, bos_token_id=2)).train()


def tiny_gemma2(softcap: float):
    """A real Gemma 2, which soft-caps its logits after the LM head (``softcap * tanh(z / softcap)``)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                          final_logit_softcapping=softcap, pad_token_id=0, eos_token_id=2,
                                          bos_token_id=2)).train()


def transformers_logprobs(model, rollout, share, monkeypatch, chunked: bool):
    """logprobs_and_grads on transformers' forward, with logits chunked 7 positions at a time
    (``chunked``) or computed whole by the model's own head; and the chunks' lengths."""
    from helpers import logprobs_and_grads

    chunks = []
    with monkeypatch.context() as m:
        if chunked:
            m.setattr(lp, "LOGIT_CHUNK", 7 * 384)
            spy_on_chunks(m, chunks)
        else:
            m.setattr(lp, "_capturable_head", lambda model: None)
        logp, grads = logprobs_and_grads(model, rollout, slice(0, 12), share=share, lean=False)
    return logp, grads, chunks


@pytest.mark.parametrize("share", [True, False], ids=["shared-prompts", "prompt-per-row"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_forward_chunks_its_logits_with_the_plain_result(arch, share, monkeypatch):
    """What DDP, DeepSpeed ZeRO-1/2 and architectures without a lean forward run: the head's inputs
    are recorded and the log-probs computed 7 positions a chunk, equal to the model's own logits'
    (values and every parameter's gradient)."""
    model = build_tiny_llama(layers=2, hidden=32).train() if arch == "llama" else tiny_gpt2()
    rollout = ragged_rollout(model)
    plain, plain_grads, _ = transformers_logprobs(model, rollout, share, monkeypatch, chunked=False)
    got, grads, chunks = transformers_logprobs(model, rollout, share, monkeypatch, chunked=True)
    assert chunks == chunk_rows(got.numel(), 7) * 2 and got.numel() % 7
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_a_model_that_soft_caps_its_logits_after_the_head_keeps_its_own_logits(monkeypatch):
    """Gemma 2 changes its logits after the LM head: the recorded head inputs would give other
    log-probs, so the first pass finds that out and every pass uses the model's own logits."""
    model = tiny_gemma2(softcap=0.5)
    rollout = ragged_rollout(model)
    plain, plain_grads, _ = transformers_logprobs(model, rollout, True, monkeypatch, chunked=False)
    assert model not in lp.LOGITS_AFTER_HEAD  # not known yet: the first chunked attempt finds it out
    for attempt in range(2):
        got, grads, chunks = transformers_logprobs(model, rollout, True, monkeypatch, chunked=True)
        assert chunks == [] and model in lp.LOGITS_AFTER_HEAD, attempt
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_every_chunk_of_a_pass_reuses_one_logits_buffer(monkeypatch):
    """Forward and backward each compute all their chunks' logits in one buffer (a chunk's logits
    are tens of megabytes at realistic shapes, a fresh mapping every time), the last, shorter
    chunk in its first rows."""
    torch.manual_seed(0)
    n, tc, hidden_size, vocab = 3, 11, 8, 50
    hidden = torch.randn(n, tc, hidden_size, requires_grad=True)
    linear = torch.nn.Linear(hidden_size, vocab, bias=False)
    targets = torch.randint(0, vocab, (n, tc))
    real, seen = lp._logits_into, []
    monkeypatch.setattr(lp, "_logits_into", lambda *a: seen.append(real(*a)) or seen[-1])
    logp = lp.chunked_token_logprobs(hidden, linear, targets, 1.0, False, vocab, budget=4 * vocab)
    forward = list(seen)
    logp.sum().backward()
    backward = seen[len(forward):]
    assert [t.shape[0] for t in forward] == [4] * 8 + [1] and [t.shape[0] for t in backward] == [4] * 8 + [1]
    assert len({t.data_ptr() for t in forward}) == 1 and len({t.data_ptr() for t in backward}) == 1
