"""bf16 on CPU: attention runs in float32 (torch's bf16 CPU flash-attention backward is slow)."""

import json

import torch

from helpers import build_tiny_llama
from zenalign.models.attention import NAME, float32_attention_on_cpu, sdpa_in_float32
from zenalign.grpo.logprobs import completion_logprobs


def batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def test_the_switch_applies_only_to_bf16_on_cpu_with_sdpa():
    model = build_tiny_llama(seed=1)
    assert model.config._attn_implementation == "sdpa"
    assert not float32_attention_on_cpu(model, torch.device("cpu"), "fp32")
    assert not float32_attention_on_cpu(model, torch.device("cuda"), "bf16")
    assert model.config._attn_implementation == "sdpa"
    assert float32_attention_on_cpu(model, torch.device("cpu"), "bf16")
    assert model.config._attn_implementation == NAME
    eager = build_tiny_llama(seed=1)
    eager.set_attn_implementation("eager")
    assert not float32_attention_on_cpu(eager, torch.device("cpu"), "bf16")  # only sdpa is replaced


def test_float32_attention_matches_sdpa_on_the_upcast_inputs():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = build_tiny_llama(seed=1)
    module = model.model.layers[0].self_attn
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 7, 8, dtype=torch.bfloat16) for _ in range(3))
    out, _ = sdpa_in_float32(module, q, k, v, None, dropout=0.0, scaling=8 ** -0.5, is_causal=True)
    expected, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, dropout=0.0, scaling=8 ** -0.5,
                                         is_causal=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))


def test_bf16_log_probs_and_gradients_stay_close_to_fp32():
    ids, mask = batch()
    reference = build_tiny_llama(seed=2)
    logp32 = completion_logprobs(reference, ids, mask, prompt_length=6, share_prompts=False)
    logp32.sum().backward()
    grad32 = reference.model.layers[0].self_attn.q_proj.weight.grad.clone()

    model = build_tiny_llama(seed=2)
    assert float32_attention_on_cpu(model, torch.device("cpu"), "bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = completion_logprobs(model, ids, mask, prompt_length=6, share_prompts=False)
    logp.sum().backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert (logp - logp32).abs().max() < 0.01  # bf16 linear layers: ~1e-3 (padding ignored: 0.056)
    cosine = torch.nn.functional.cosine_similarity(grad.flatten(), grad32.flatten(), dim=0)
    assert cosine > 0.99, cosine


def test_a_bf16_cpu_run_trains_with_it_and_saves_a_plain_config(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from zenalign import GRPOTrainer

    prompts = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in ["abc", "hello", "xyz", "kite"]]
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=lambda completions: [float(len(c)) for c in completions],
                          steps=2, group_size=4, prompts_per_step=2, max_new_tokens=5, precision="bf16", kl_coef=0.1,
                          progress_bar=False, eval_interval=0, output_dir=str(tmp_path / "run"), seed=0)
    result = trainer.train(prompts, prompts[:1])
    assert trainer.model.config._attn_implementation == NAME
    assert trainer.reference.config._attn_implementation == NAME
    saved = result.final_policy if hasattr(result, "final_policy") else tmp_path / "run" / "final"
    config = json.loads((saved / "config.json").read_text())
    assert NAME not in json.dumps(config)
    assert AutoModelForCausalLM.from_pretrained(saved).config._attn_implementation == "sdpa"
