"""Group sampling with a real (tiny) Llama: layout, EOS/pad masking, and log-prob consistency
between generation and the loss's forward pass under left padding."""

import pytest
import torch

from conftest import build_tiny_llama, byte_tokenizer
from zenalign.loss import completion_logprobs
from zenalign.recipe import SamplingSection
from zenalign.sampling import completion_mask_from, generate_groups, generation_config, neutral_generation_defaults

EOS, PAD = 1, 0
PROMPTS = ["reverse abc:", "hi", "a much longer prompt than the others:"]


def test_completion_mask_stops_after_first_eos():
    tokens = torch.tensor([[5, 6, EOS, PAD], [5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, 9, EOS, 9]])
    mask, truncated = completion_mask_from(tokens, [EOS])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    # several EOS ids (e.g. <|eot_id|> and <|end_of_text|>) all end a completion
    mask, _ = completion_mask_from(torch.tensor([[5, 7, 6, 1]]), [1, 7])
    assert mask.tolist() == [[1, 1, 0, 0]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(seed=3).eval()


def test_groups_are_contiguous_and_masked(model):
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    sampling = SamplingSection(group_size=3, max_new_tokens=6)
    rollout = generate_groups(model, tokenizer, PROMPTS, sampling, [EOS], group_size=3)
    n = len(PROMPTS) * 3
    assert rollout.sequences.shape[0] == n and len(rollout.completions) == n
    encoded = tokenizer(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    for p in range(len(PROMPTS)):
        for i in range(p * 3, p * 3 + 3):  # rows g*G .. g*G+G-1 answer prompt g
            assert rollout.sequences[i, : rollout.prompt_length].tolist() == encoded["input_ids"][p].tolist()
    tokens = rollout.completion_tokens
    for i in range(n):
        length = int(rollout.completion_mask[i].sum())
        real = tokens[i, :length].tolist()
        if rollout.truncated[i]:
            assert EOS not in real and len(rollout.completion_ids[i]) == length
        else:
            assert real[-1] == EOS and EOS not in real[:-1]
            assert rollout.completion_ids[i] == real[:-1]
        assert rollout.completions[i] == tokenizer.decode(rollout.completion_ids[i], skip_special_tokens=True)
        # padding after EOS is masked out of attention too
        assert rollout.attention_mask[i, rollout.prompt_length:].tolist() == rollout.completion_mask[i].tolist()
    # left padding: the shortest prompt's pad columns are masked
    assert rollout.attention_mask[3, : rollout.prompt_length].sum() == len("hi")


def test_loss_logprobs_equal_the_sampled_distribution(model):
    """log pi recomputed for the loss == log_softmax(logits / T) that generate sampled from,
    for left-padded prompts of different lengths (positions must follow the mask)."""
    tokenizer = byte_tokenizer()
    sampling = SamplingSection(group_size=2, max_new_tokens=5, temperature=0.7)
    encoded = tokenizer(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(1)
    config = generation_config(sampling, [EOS], PAD, greedy=False, num_return_sequences=2)
    config.update(output_logits=True, return_dict_in_generate=True)
    with neutral_generation_defaults(model):
        out = model.generate(**encoded, generation_config=config)
    raw = torch.stack(out.logits, dim=1).float() / 0.7  # (N, Tc, V)
    prompt_length = encoded["input_ids"].shape[1]
    tokens = out.sequences[:, prompt_length:]
    expected = torch.log_softmax(raw, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    mask, _ = completion_mask_from(tokens, [EOS])
    attention = torch.cat([encoded["attention_mask"].repeat_interleave(2, 0), mask], dim=1)
    got = completion_logprobs(model, out.sequences, attention, prompt_length, temperature=0.7)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_model_generation_config_does_not_leak_into_sampling():
    """A model whose generation_config asks for top_k=3, repetition_penalty=5 and temperature 0.3
    must still be sampled from plain softmax(logits / T) with the recipe's settings, or the
    policy gradient would be computed for a different distribution."""
    model = build_tiny_llama(seed=4).eval()
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.temperature = 0.3
    model.generation_config.do_sample = True
    tokenizer = byte_tokenizer()
    sampling = SamplingSection(max_new_tokens=4, temperature=1.0)
    encoded = tokenizer(PROMPTS[:1], add_special_tokens=False, return_tensors="pt")
    config = generation_config(sampling, [EOS], PAD, greedy=False, num_return_sequences=1)
    config.update(output_logits=True, output_scores=True, return_dict_in_generate=True)
    with neutral_generation_defaults(model):
        out = model.generate(**encoded, generation_config=config)
    assert model.generation_config.repetition_penalty == 5.0  # restored afterwards
    for raw, processed in zip(out.logits, out.scores):
        assert torch.isfinite(processed).all()  # no top-k masking
        assert torch.allclose(torch.log_softmax(processed, -1), torch.log_softmax(raw, -1), atol=1e-5)


def test_greedy_is_deterministic(model):
    tokenizer = byte_tokenizer()
    sampling = SamplingSection(max_new_tokens=6)
    first = generate_groups(model, tokenizer, PROMPTS, sampling, [EOS], group_size=1, greedy=True)
    torch.manual_seed(123)
    second = generate_groups(model, tokenizer, PROMPTS, sampling, [EOS], group_size=1, greedy=True)
    assert first.completions == second.completions
