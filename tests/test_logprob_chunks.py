"""Log-probs a chunk of positions at a time (zenalign.grpo.logprobs.chunked_token_logprobs): the
same values, entropies and gradients as the plain computation, while autograd keeps only the
chunks' hidden states instead of every logit."""

import pytest
import torch

from conftest import build_tiny_llama, ragged_rollout
from zenalign.grpo import logprobs as lp


def saved_bytes(fn):
    """What autograd keeps for backward while ``fn`` runs, and its result."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes), out


@pytest.mark.parametrize("entropy", [False, True])
def test_chunks_give_the_plain_values_and_gradients_and_keep_no_logits(entropy):
    torch.manual_seed(0)
    n, tc, hidden_size, vocab = 3, 37, 16, 500
    hidden = torch.randn(n, tc, hidden_size, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    targets = torch.randint(0, vocab, (n, tc))
    weights = torch.linspace(0.5, 2.0, n * tc).reshape(n, tc)
    results = {}
    for budget in (n * tc * vocab, n * 5 * vocab):  # everything at once; 5 positions a chunk (8 chunks)
        hidden.grad, head.weight.grad = None, None
        kept, out = saved_bytes(lambda: lp.chunked_token_logprobs(hidden, head, targets, 0.7, entropy, vocab, budget))
        logp = out[0] if entropy else out
        (logp * weights).sum().backward()
        results[budget] = (kept, logp.detach(), out[1] if entropy else None, hidden.grad.clone(), head.weight.grad.clone())
    plain, chunked = results[n * tc * vocab], results[n * 5 * vocab]
    for a, b in zip(plain[1:], chunked[1:]):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    logits_bytes = n * tc * vocab * 4
    assert plain[0] > logits_bytes  # the plain pass keeps the (N, Tc, V) log-softmax for backward
    assert chunked[0] < 0.1 * logits_bytes  # the chunked one keeps each chunk's hidden states only


def test_the_lean_pass_chunks_its_logits_with_the_same_result(monkeypatch):
    model = build_tiny_llama(layers=2, hidden=32).train()
    rollout = ragged_rollout(model)
    outputs, chunks = {}, []
    real = lp.checkpoint
    monkeypatch.setattr(lp, "checkpoint", lambda *a, **k: chunks.append(1) or real(*a, **k))
    for budget in (lp.LOGIT_CHUNK, 12 * 384 * 2):  # the default (one chunk here), then 2 positions a chunk
        monkeypatch.setattr(lp, "LOGIT_CHUNK", budget)
        model.zero_grad(set_to_none=True)
        logp = lp.completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, 0.7,
                                      lean=True)
        (logp * rollout.completion_mask).sum().backward()
        outputs[budget] = (logp.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    assert len(chunks) == (rollout.sequences.shape[1] - rollout.prompt_length + 1) // 2  # only the second pass chunked
    (a, grads_a), (b, grads_b) = outputs.values()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)
