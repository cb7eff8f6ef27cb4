"""The lean forward (zenalign.models.lean) against transformers' own forward and generate, for every
architecture it covers: the same log-probs, the same gradient for every parameter, the same
sampled tokens; and the models it must leave to transformers."""

import pytest
import torch

from helpers import (EOS, PROMPTS, TINY_ARCHS, assert_lean_bf16_as_close_as_transformers, build_tiny_causal_lm, build_tiny_llama, byte_tokenizer, logprobs_and_grads, sample_groups,
                      saved_bytes)
from zenalign.models import lean as fastpath
from zenalign.models.lean import attention_products, lean_model, why_not_lean
from zenalign.grpo.gumbel import GumbelSampler, completion_keys
from zenalign.grpo.logprobs import completion_logprobs
from zenalign.grpo.rollout import decode_groups

SEED = 3  # the weights of this module's models, unless a test says otherwise


@pytest.fixture(scope="module", params=TINY_ARCHS)
def model(request):
    model = build_tiny_causal_lm(request.param, seed=SEED)
    assert lean_model(model) is not None, why_not_lean(model)
    return model


@pytest.mark.parametrize("halves", ["autograd", "recomputing"])
@pytest.mark.parametrize("attention", ["products", "fused"])
@pytest.mark.parametrize("share", [True, False], ids=["shared-prompts", "prompt-per-row"])
@pytest.mark.parametrize("rows", [slice(0, 12), slice(3, 10)], ids=["whole-batch", "micro-batch-across-groups"])
def test_lean_log_probs_and_gradients_equal_transformers(model, rollout, rows, share, attention, halves, monkeypatch):
    """Both of the lean pass's attention kernels: products (what these small shapes use) and the
    fused one (what shapes above fastpath.SMALL_ATTENTION use); both ways of running a layer with
    autograd: plain autograd (what these small shapes use) and the layer halves that recompute
    (what passes from fastpath.RECOMPUTE_FROM residual elements use)."""
    assert rollout.truncated.any() and not rollout.truncated.all()
    if attention == "fused":
        monkeypatch.setattr(fastpath, "SMALL_ATTENTION", 0)
    monkeypatch.setattr(fastpath, "RECOMPUTE_FROM", 0 if halves == "recomputing" else 1 << 62)
    gates, saves_less = [], fastpath._saves_less
    monkeypatch.setattr(fastpath, "_saves_less", lambda x, w: gates.append(saves_less(x, w)) or gates[-1])
    plain_logp, plain_grads = logprobs_and_grads(model, rollout, rows, lean=False, share=False)
    lean_logp, lean_grads = logprobs_and_grads(model, rollout, rows, lean=True, share=share)
    assert gates and set(gates) == {halves == "recomputing"}
    torch.testing.assert_close(lean_logp, plain_logp, rtol=0, atol=2e-5)
    assert lean_grads.keys() == plain_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("halves", ["autograd", "recomputing"])
def test_lean_bf16_autocast_is_as_close_to_float32_as_transformers_bf16(model, rollout, halves, monkeypatch):
    """Under bf16 autocast neither path equals float32; the lean one must not be further off."""
    monkeypatch.setattr(fastpath, "RECOMPUTE_FROM", 0 if halves == "recomputing" else 1 << 62)
    rows = slice(0, 12)
    assert_lean_bf16_as_close_as_transformers(model, rollout, rows)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_lean_decoding_samples_what_transformers_samples(model, temperature, top_k, top_p):
    plain = sample_groups(model, lean_forward=False, temperature=temperature, top_k=top_k, top_p=top_p)
    lean = sample_groups(model, lean_forward=True, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(lean.sequences, plain.sequences) and lean.completions == plain.completions
    assert lean.completion_mask.shape[1] == 10  # something ran the whole length


def test_decoding_indexes_a_rotary_table_equal_to_the_models_rotation(model):
    """Decoding looks each token's rotation up in a table built once; every row of the table is
    bit for bit the rotation the model's rotary module gives that position."""
    lean = lean_model(model)
    x = torch.zeros(3, model.config.hidden_size)
    table = lean.rotary_table(x, 40)
    positions = torch.tensor([0, 7, 39])
    assert table.shape[0] == 40 and torch.equal(table.index_select(0, positions), lean.rotary(x, positions))


def test_rotary_scaling_that_depends_on_the_positions_is_recomputed_every_token():
    """Dynamic NTK scaling changes its frequencies once positions pass the trained length, so
    decoding calls the model's rotary module each token, and samples what transformers samples
    beyond that length."""
    model = build_tiny_causal_lm("qwen2", seed=SEED, max_position_embeddings=16,
                                 rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    lean = lean_model(model)
    assert lean.rotary_table(torch.zeros(1, model.config.hidden_size), 40) is None
    plain, fast = sample_groups(model, lean_forward=False), sample_groups(model, lean_forward=True)
    assert plain.sequences.shape[1] > 16 + 5
    assert torch.equal(fast.sequences, plain.sequences)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_weights_first_products_equal_linear(dtype, bias):
    """``(W @ x.T).T`` is ``F.linear(x, W, b)``, and the residual form adds it to ``x``."""
    torch.manual_seed(0)
    x, a = torch.randn(48, 32, dtype=dtype), torch.randn(48, 96, dtype=dtype)
    weight, down = torch.randn(96, 32, dtype=dtype), torch.randn(32, 96, dtype=dtype)
    b = torch.randn(96, dtype=dtype) if bias else None
    tol = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=0.05)
    torch.testing.assert_close(fastpath._linear_weights_first(x, weight, b), torch.nn.functional.linear(x, weight, b), **tol)
    got = fastpath._add_linear_weights_first(x, a, down, b[:32] if bias else None)
    torch.testing.assert_close(got, x + torch.nn.functional.linear(a, down, b[:32] if bias else None), **tol)
    assert got.is_contiguous()  # the residual keeps its layout


def test_weights_first_products_are_for_cpu_inference_at_32_rows_or_more():
    with torch.no_grad():
        assert fastpath._weights_first(torch.zeros(32, 8)) and not fastpath._weights_first(torch.zeros(31, 8))
    assert not fastpath._weights_first(torch.zeros(64, 8))  # autograd on: the update keeps x @ W.T
    with torch.inference_mode():
        assert fastpath._weights_first(torch.zeros(64, 8))


def test_lean_decoding_with_weights_first_products_samples_what_transformers_samples(model, monkeypatch):
    """36 rows (3 prompts x 12): the MLP's products run weights-first in every decoding step, and
    the tokens are still transformers' own. (In float32 with MKL the packed products take their
    place, so MKL is switched off here; bf16 decoding and builds without MKL use this path.)"""
    monkeypatch.setattr(fastpath, "_MKL_LINEAR", None)
    calls = []
    monkeypatch.setattr(fastpath, "_linear_weights_first",
                        lambda *a, f=fastpath._linear_weights_first: calls.append(a[0].shape[0]) or f(*a))
    out = {lean: sample_groups(model, group_size=12, max_new_tokens=8, seed=1, step=2, lean_forward=lean)
           for lean in (True, False)}
    assert calls.count(36) >= 2 * 7  # two products per layer and token after the first
    assert torch.equal(out[True].sequences, out[False].sequences)


@pytest.mark.skipif(fastpath._MKL_LINEAR is None, reason="this torch has no MKL")
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_mkl_packed_products_equal_linear_to_the_bit_and_fall_back_for_other_row_counts(bias):
    torch.manual_seed(0)
    weight, b = torch.randn(48, 20), (torch.randn(48) if bias else None)
    packed = fastpath._Packed.of(weight, 9)
    for rows in (9, 4, 13):  # its own row count, and two it was not packed for
        x = torch.randn(rows, 20)
        assert torch.equal(packed(x, b), torch.nn.functional.linear(x, weight, b)), rows
    assert fastpath._Packed.of(weight.to(torch.bfloat16), 9) is None  # float32 only


@pytest.mark.skipif(fastpath._MKL_LINEAR is None, reason="this torch has no MKL")
def test_float32_decoding_on_packed_weights_samples_what_transformers_samples(model, monkeypatch):
    """Every product of a decoding step runs on MKL's packed weights (4 per layer and the LM head),
    for exactly the decoding rows, and the sampled tokens are transformers' own; under bf16
    autocast nothing is packed."""
    rows = []
    monkeypatch.setattr(fastpath, "_MKL_LINEAR", lambda x, *a, f=fastpath._MKL_LINEAR: rows.append(x.shape[0]) or f(x, *a))
    out = {lean: sample_groups(model, group_size=4, max_new_tokens=8, seed=1, step=2, lean_forward=lean)
           for lean in (True, False)}
    layers = model.config.num_hidden_layers
    assert set(rows) == {12} and len(rows) >= 7 * (4 * layers + 1), (set(rows), len(rows))
    assert torch.equal(out[True].sequences, out[False].sequences)
    rows.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample_groups(model, group_size=4, max_new_tokens=4, seed=1, step=2, lean_forward=True)
    assert rows == []


def test_bf16_decoding_casts_the_lm_head_once_and_samples_what_the_per_token_cast_samples(model, monkeypatch):
    """Under bf16 autocast the decode casts the LM head's weight once, as it does every layer's,
    instead of autocast casting it again for every token (at the 135m shape that cast was 20 ms
    of a 62 ms token). The same bf16 weight either way, so the same tokens: the decode with the
    head through the module, as before, samples the same sequences; and the module itself now
    runs once per decode (the prompts' last positions), not once per token."""
    calls = []
    monkeypatch.setattr(model.lm_head, "forward", lambda h, f=model.lm_head.forward: calls.append(h.shape[0]) or f(h))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sample_groups(model, group_size=4, max_new_tokens=8, seed=1, step=2, lean_forward=True)
    once = run()
    assert len(calls) == 1, calls
    calls.clear()
    head = fastpath.LeanLM.head
    monkeypatch.setattr(fastpath.LeanLM, "head", lambda self, h, product=None: head(self, h))  # through the module
    per_token = run()
    new_tokens = once.sequences.shape[1] - once.prompt_length
    assert new_tokens > 1 and len(calls) == new_tokens, calls  # the prompts' step, then one per token after the first
    assert torch.equal(once.sequences, per_token.sequences)


@pytest.mark.parametrize("fused_forward", [True, False], ids=["fused-forward", "torch-without-it"])
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16)])
def test_rms_norm_with_written_out_gradient_equals_torchs(shape, fused_forward, monkeypatch):
    """The lean pass's float32 RMSNorm: the same output bit for bit as F.rms_norm, and the
    gradients of input and weight that autograd takes through F.rms_norm (also without the
    fused forward that returns the reciprocal RMS, as on torch < 2.8)."""
    if not fused_forward:
        monkeypatch.setattr(fastpath, "_FUSED_RMS_NORM", None)
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).requires_grad_()
    weight = torch.randn(shape[-1]).requires_grad_()
    grad_out = torch.randn(shape)
    out = fastpath._rms_norm(x, weight, 1e-5)
    expected = torch.nn.functional.rms_norm(x, (shape[-1],), weight, 1e-5)
    assert torch.equal(out, expected) if fused_forward else torch.allclose(out, expected, rtol=0, atol=1e-6)
    grads = torch.autograd.grad(out, (x, weight), grad_out)
    for got, want in zip(grads, torch.autograd.grad(expected, (x, weight), grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    frozen = weight.detach()
    (grad_x,) = torch.autograd.grad(fastpath._rms_norm(x, frozen, 1e-5), (x,), grad_out)
    torch.testing.assert_close(grad_x, grads[0], rtol=0, atol=0)
    with torch.no_grad():  # decoding, reference and old-policy passes: the fused kernel, F.rms_norm's values
        assert torch.equal(fastpath._rms_norm(x, weight, 1e-5), expected)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_attention_products_equal_the_fused_kernel_with_gradients(heads, kv_heads):
    """The written-out attention against torch's kernel with every key/value head repeated for its
    query heads: outputs and the gradients of queries, keys and values, with left padding and a
    causal block in the mask, on the transposed layouts the lean pass hands it."""
    torch.manual_seed(0)
    b, t, s, d = 3, 5, 8, 16
    q = torch.randn(b, t, heads, d).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(b, s, kv_heads, d).transpose(1, 2).requires_grad_() for _ in range(2))
    mask = torch.ones(b, 1, t, s, dtype=torch.bool)
    mask[1, :, :, :2] = False  # a row with two padding columns
    mask[:, :, :, s - t:] = torch.ones(t, t, dtype=torch.bool).tril()  # the last t keys: causal
    out = attention_products(q, k, v, mask, 0.3)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1), attn_mask=mask, scale=0.3)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_lean_attention_switches_to_the_fused_kernel_above_the_size_limit(model, monkeypatch):
    """A pass whose scores number more than SMALL_ATTENTION goes to the fused kernel (whose
    memory does not grow with them); one at or below it to the products; the two agree."""
    lean = lean_model(model)
    calls = []
    monkeypatch.setattr(fastpath, "attention_products", lambda *a: calls.append(a) or attention_products(*a))
    torch.manual_seed(1)
    b, t, s = 2, 3, 7
    q = torch.randn(b, lean.heads, t, lean.head_dim)
    k, v = torch.randn(2, b, lean.kv_heads, s, lean.head_dim)
    mask = torch.rand(b, 1, t, s) > 0.3
    mask[..., 0] = True
    monkeypatch.setattr(fastpath, "SMALL_ATTENTION", b * lean.heads * t * s)
    products = lean.attend(q, k, v, mask)
    assert len(calls) == 1
    monkeypatch.setattr(fastpath, "SMALL_ATTENTION", b * lean.heads * t * s - 1)
    fused = lean.attend(q, k, v, mask)
    assert len(calls) == 1
    torch.testing.assert_close(products, fused, rtol=0, atol=1e-5)


def test_single_query_attention_runs_in_float32_under_autocast(model):
    """Decoding attention under bf16 autocast: float32 products over the float32 cache, rounded to
    bf16 once at the end (autocast would otherwise run both products in bf16 and cast the whole
    cache every step)."""
    lean = lean_model(model)
    torch.manual_seed(0)
    n, s = 6, 9
    q = torch.randn(n, lean.heads, lean.head_dim)
    k, v = torch.randn(2, n, lean.kv_heads, s, lean.head_dim)
    bias = torch.zeros(n, 1, 1, s)
    bias[:, :, :, :2] = float("-inf")  # two padding columns
    repeat = lean.heads // lean.kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1), attn_mask=bias == 0,
        scale=lean.scaling).squeeze(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lean.attend_one(q, k, v, bias)
        assert torch.is_autocast_enabled("cpu") and torch.mm(q[0], q[0].T).dtype == torch.bfloat16  # back on after it
    assert not torch.is_autocast_enabled("cpu")
    assert got.dtype == torch.bfloat16
    # one bf16 rounding of the float32 result (relative 2^-8), nothing more
    assert ((got.float() - expected).abs() <= expected.abs() * 2 ** -8 + 1e-6).all()


def test_lean_decoding_stops_when_every_row_has_ended(model):
    """EOS made certain after two tokens (a logits processor): the loop ends there, with padding
    after each row's EOS, exactly as transformers' loop does."""
    encoded = byte_tokenizer()(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    tp = encoded["input_ids"].shape[1]

    def eos_at_third(tokens, scores):
        if tokens.shape[1] - tp == 2:
            scores = torch.full_like(scores, -1e9)
            scores[:, EOS] = 0.0
        return scores

    keys = completion_keys(seed=3, step=1, first_completion=0, count=12)
    out = {}
    for lean in (True, False):
        processors = [GumbelSampler(keys, tp, 1.0), eos_at_third]
        with torch.inference_mode():
            out[lean] = decode_groups(model, encoded["input_ids"], encoded["attention_mask"], 4, 9, [EOS], 0,
                                    lambda t, s, p=processors: p[1](t, p[0](t, s)), lean=lean)
    assert out[True].shape == (12, tp + 3) and torch.equal(out[True], out[False])
    assert (out[True][:, -1] == EOS).all()


def test_models_the_lean_forward_leaves_to_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    sliding = build_tiny_causal_lm("qwen2", seed=SEED, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert "sliding" in why_not_lean(sliding)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=2))
    assert "GPT2LMHeadModel is not one of" in why_not_lean(gpt2)
    assert "activation" in why_not_lean(build_tiny_causal_lm("llama", seed=SEED, hidden_act="gelu"))

    class Adapter(torch.nn.Linear):  # what LoRA or a quantised layer looks like from outside
        pass

    adapted = build_tiny_causal_lm("qwen2", seed=SEED)
    old = adapted.model.layers[1].self_attn.v_proj
    adapted.model.layers[1].self_attn.v_proj = Adapter(old.in_features, old.out_features)
    assert "adapters" in why_not_lean(adapted) and lean_model(adapted) is None
    ddp_like = torch.nn.Sequential(build_tiny_causal_lm("llama", seed=SEED))  # any wrapper: its own class is not covered
    assert lean_model(ddp_like) is None


def test_lean_forward_is_kept_out_of_the_state_dict():
    model = build_tiny_causal_lm("llama", seed=SEED)
    before = set(model.state_dict())
    assert lean_model(model) is lean_model(model)  # built once per model
    assert set(model.state_dict()) == before


@pytest.mark.slow
def test_training_runs_the_same_with_and_without_the_lean_forward(tmp_path, tiny_model_dir):
    """Two GRPO steps through the trainer (sampling, KL to a reference, mu = 2, micro-batches that
    cut across groups): the same samples, rewards and losses with either forward."""
    import json

    from zenalign import GRPOTrainer

    prompts = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in ["abc", "hello", "xyz", "kite", "moon", "sun"]]
    metrics = {}
    for lean in (True, False):
        out = tmp_path / f"lean-{lean}"
        GRPOTrainer(model=str(tiny_model_dir), reward_model=lambda completions, **_: [float(len(c)) for c in completions],
                    steps=2, group_size=4, prompts_per_step=3, max_new_tokens=8, kl_coef=0.1, num_iterations=2,
                    micro_batch_size=5, progress_bar=False, output_dir=str(out), seed=0, lean_forward=lean,
                    eval_interval=0).train(prompts, prompts[:2])
        metrics[lean] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for fast, plain in zip(metrics[True], metrics[False]):
        assert fast["reward_mean"] == plain["reward_mean"] and fast["completion_len"] == plain["completion_len"]
        for key in ("loss", "kl", "grad_norm", "ratio_mean"):
            assert fast[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), key


def test_a_lean_forward_that_disagrees_with_transformers_is_not_used(rollout, caplog, monkeypatch):
    """The first use checks the lean forward against transformers' on the prompts at hand; a model
    variant the eligibility rules missed (here: a head that scales the logits) falls back, with a
    warning that says why, and the log-probs are transformers' own."""
    import logging

    from zenalign.models.lean import LeanLM

    model = build_tiny_causal_lm("qwen2", seed=9)
    original = LeanLM.head
    monkeypatch.setattr(LeanLM, "head", lambda self, h: original(self, h) * 1.5)
    with caplog.at_level(logging.WARNING, logger="zenalign"), torch.no_grad():
        got = completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    assert "the lean forward disagrees with transformers' forward for Qwen2ForCausalLM" in caplog.text
    assert lean_model(model) is None  # for the rest of the run
    with torch.no_grad():
        plain = completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, lean=False)
    assert torch.equal(got, plain)


def test_the_check_runs_once_and_passes_for_a_faithful_model(rollout, caplog):
    import logging

    model = build_tiny_causal_lm("llama", seed=9)
    with caplog.at_level(logging.WARNING, logger="zenalign"), torch.no_grad():
        completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    fast = lean_model(model)
    assert fast is not None and fast.checked and "disagrees" not in caplog.text


def test_a_model_with_bf16_weights_passes_the_check_and_stays_close(rollout, caplog):
    """DeepSpeed's bf16 mode hands over bf16 weights (no autocast): both forwards then round
    differently, within the check's low-precision limit."""
    import logging

    model = build_tiny_causal_lm("qwen2", seed=9).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="zenalign"), torch.no_grad():
        lean = completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length)
        plain = completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, lean=False)
    assert "disagrees" not in caplog.text and lean_model(model) is not None
    mask = rollout.completion_mask.bool()
    assert float((lean - plain)[mask].abs().max()) < 0.1


def test_a_lean_forward_that_raises_on_first_use_falls_back_instead_of_stopping_the_run(caplog, monkeypatch):
    """A module layout the eligibility rules did not foresee: the first-use check reports what the
    lean forward raised, and sampling goes on with transformers' decoding (same tokens)."""
    import logging

    from zenalign.models.lean import LeanLM

    model = build_tiny_causal_lm("llama", seed=11)
    expected = sample_groups(model, lean_forward=False)

    def broken(self, *args):
        raise AttributeError("'LlamaAttention' object has no attribute 'q_proj'")

    monkeypatch.setattr(LeanLM, "prefill", broken)
    with caplog.at_level(logging.WARNING, logger="zenalign"):
        got = sample_groups(model, lean_forward=True)
    assert "disagrees with transformers' forward for LlamaForCausalLM (AttributeError:" in caplog.text
    assert torch.equal(got.sequences, expected.sequences) and lean_model(model) is None


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_the_layer_halves_that_save_less_give_autograds_values_and_gradients(bias):
    """_NormLinear (norm, then a product) and _SwiGLUDown (the MLP's second half and residual)
    against autograd through the same operations: equal outputs and gradients of every input,
    with no normalised rows and no (T, I) activation kept for backward."""
    torch.manual_seed(0)
    t, hidden, inter, eps = 7, 16, 24, 1e-6
    x = (torch.randn(t, hidden) * 2).requires_grad_()
    norm_w = torch.nn.Parameter(torch.rand(hidden) + 0.5)
    gate_up_w = torch.nn.Parameter(torch.randn(2 * inter, hidden) / 4)
    down_w = torch.nn.Parameter(torch.randn(hidden, inter) / 5)
    gate_up_b = torch.nn.Parameter(torch.randn(2 * inter)) if bias else None
    down_b = torch.nn.Parameter(torch.randn(hidden)) if bias else None
    inputs = [x, norm_w, gate_up_w, down_w] + ([gate_up_b, down_b] if bias else [])
    weights = torch.linspace(-1.0, 1.0, t * hidden).reshape(t, hidden)

    def plain():
        gate, up = torch.nn.functional.linear(torch.nn.functional.rms_norm(x, (hidden,), norm_w, eps), gate_up_w,
                                              gate_up_b).chunk(2, dim=-1)
        return x + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down_w, down_b)

    def fused():
        gate_up = fastpath._NormLinear.apply(x, norm_w, gate_up_w, gate_up_b, eps, torch.float32)
        return fastpath._SwiGLUDown.apply(x, gate_up, down_w, down_b, torch.float32)

    results = {}
    for name, fn in (("plain", plain), ("fused", fused)):
        for p in inputs:
            p.grad = None
        kept, out = saved_bytes(fn)
        (out * weights).sum().backward()
        results[name] = kept, out.detach(), [p.grad.clone() for p in inputs]
    (plain_kept, plain_out, plain_grads), (fused_kept, fused_out, fused_grads) = results["plain"], results["fused"]
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(plain_grads, fused_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # kept: x, the rows' 1/rms and the gate/up product, against autograd's normalised rows and (T, I) activation too
    assert fused_kept == 4 * (t * hidden + t + t * 2 * inter), fused_kept
    assert plain_kept >= fused_kept + 4 * (t * hidden + t * inter), (plain_kept, fused_kept)


def test_the_mlp_half_writes_the_gate_up_gradient_over_the_saved_product():
    """_SwiGLUDown's backward returns the gate/up gradient in the storage of the gate/up product it
    saved (no fresh (T, 2I) tensor), with autograd's values; a second backward through the same
    graph stops with autograd's in-place error instead of reading the overwritten product."""
    torch.manual_seed(0)
    t, hidden, inter = 5, 8, 12
    x = torch.randn(t, hidden, requires_grad=True)
    down = torch.randn(hidden, inter, requires_grad=True)
    source = torch.randn(t, 2 * inter, requires_grad=True)
    weights = torch.linspace(-1.0, 1.0, t * hidden).reshape(t, hidden)
    gate, up = source.chunk(2, dim=-1)
    (x + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)).mul(weights).sum().backward()
    expected = source.grad.clone()
    gate_up = source.detach().clone().requires_grad_()
    product = gate_up * 1.0  # a non-leaf, as the gate/up product is in a layer
    seen = []
    product.register_hook(lambda grad: seen.append(grad))
    out = fastpath._SwiGLUDown.apply(x, product, down, None, torch.float32)
    address = product.data_ptr()
    out.mul(weights).sum().backward(retain_graph=True)
    assert seen[0].data_ptr() == address
    torch.testing.assert_close(gate_up.grad, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.mul(weights).sum().backward()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_lean_update_pass_keeps_one_mask_the_queries_alone_and_no_cast_attention_output(autocast, monkeypatch):
    """What the fused attention kernel keeps on the update pass, storage by storage: the additive
    mask once for all layers (a boolean one is converted, and kept, in every layer), the
    completions' queries without the rotated keys beside them, and under autocast no bf16 copy
    of its float32 output."""
    monkeypatch.setattr(fastpath, "RECOMPUTE_FROM", 0)
    monkeypatch.setattr(fastpath, "SMALL_ATTENTION", 0)
    layers, heads, kv_heads, head_dim = 3, 2, 1, 16
    model = build_tiny_llama(seed=SEED, layers=layers).train()
    groups, group, tp, tc = 2, 3, 4, 6
    prompts = torch.randint(3, 200, (groups, tp)).repeat_interleave(group, 0)
    sequences = torch.cat([prompts, torch.randint(3, 200, (groups * group, tc))], 1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = (storage.nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        completion_logprobs(model, sequences, torch.ones_like(sequences), tp, 1.0)
    n, inputs, tokens = groups * group, tc - 1, groups * tp + groups * group * (tc - 1)
    sizes = [(nbytes, dtype) for nbytes, dtype in kept.values()]
    completion_mask = 4 * n * inputs * (tp + inputs)
    assert sizes.count((completion_mask, torch.float32)) == 1, sizes
    assert (4 * tokens * (heads + kv_heads) * head_dim, torch.float32) not in sizes       # rotated q/k rows
    assert sizes.count((4 * n * inputs * heads * head_dim, torch.float32)) == 2 * layers, sizes  # queries, output
    assert not any(dtype == torch.bfloat16 and nbytes == 2 * n * inputs * heads * head_dim for nbytes, dtype in sizes)
