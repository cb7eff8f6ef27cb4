"""Prompt sharing: each GRPO group's prompt runs once (sampling prefill, and every log-prob pass),
and the results and gradients equal the plain pass that runs the prompt once per completion.

These tests pin the path on transformers' own forward (``lean=False``), which DDP-wrapped models
and models the lean forward does not cover take; tests/models/test_fastpath.py pins the lean forward,
which shares prompts in a single pass, against the same plain pass."""

import pytest
import torch

from helpers import EOS, PROMPTS, build_tiny_causal_lm, byte_tokenizer, logprobs_and_grads, sample_groups
from zenalign.generation.gumbel import completion_keys
from zenalign.models.logprobs import completion_logprobs
from zenalign.models.primitives import prompt_groups
from zenalign.recipe.schema import SamplingSection
from zenalign.generation.rollout import generate_groups
from zenalign.train.update import PolicyUpdate


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return build_tiny_causal_lm(request.param, seed=5)


def test_prompt_groups_finds_runs_of_equal_prompts():
    sequences = torch.tensor([[0, 7, 8, 1], [0, 7, 8, 2], [5, 7, 8, 3], [5, 7, 8, 3], [5, 7, 8, 4], [0, 7, 8, 5]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    leaders, owner = prompt_groups(sequences, mask, prompt_length=3)
    # row 5 has row 0's tokens but a different mask (token 0 is real there): its own prompt
    assert leaders.tolist() == [0, 2, 5]
    assert owner.tolist() == [0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize("rows", [slice(0, 12), slice(3, 10)], ids=["whole-batch", "micro-batch-across-groups"])
def test_shared_prompts_give_the_plain_log_probs_and_gradients(model, rollout, rows):
    assert rollout.truncated.any() and not rollout.truncated.all()  # ragged completions
    plain_logp, plain_grads = logprobs_and_grads(model, rollout, rows, share=False)
    shared_logp, shared_grads = logprobs_and_grads(model, rollout, rows, share=True)
    torch.testing.assert_close(shared_logp, plain_logp, rtol=0, atol=2e-5)
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()), msg=lambda m, name=name: f"{name}: {m}")


def record_base_inputs(model):
    """Shapes of the input ids every forward pass of the decoder stack receives."""
    shapes = []
    handle = model.model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                                   with_kwargs=True)
    return shapes, handle


def test_each_prompt_runs_once_per_group(model, rollout):
    n, total = rollout.sequences.shape
    tp = rollout.prompt_length
    shapes, handle = record_base_inputs(model)
    try:
        with torch.no_grad():
            completion_logprobs(model, rollout.sequences, rollout.attention_mask, tp, lean=False)
            completion_logprobs(model, rollout.sequences, rollout.attention_mask, tp, share_prompts=False, lean=False)
    finally:
        handle.remove()
    # shared: the 3 distinct prompts, then the completions without their last token; plain: everything
    assert shapes == [(3, tp), (n, total - tp - 1), (n, total)]


def test_distinct_prompts_take_the_plain_pass(model):
    """Nothing to share (group size 1, as in greedy evaluation): one ordinary forward pass."""
    greedy = generate_groups(model, byte_tokenizer(), PROMPTS, SamplingSection(max_new_tokens=6), [EOS], group_size=1)
    shapes, handle = record_base_inputs(model)
    try:
        with torch.no_grad():
            completion_logprobs(model, greedy.sequences, greedy.attention_mask, greedy.prompt_length, lean=False)
    finally:
        handle.remove()
    assert shapes == [tuple(greedy.sequences.shape)]


def test_zenalign_decoder_prefills_each_prompt_once(model):
    shapes, handle = record_base_inputs(model)
    try:
        out = sample_groups(model, max_new_tokens=4, seed=1, decoder="zenalign", lean_forward=False)
    finally:
        handle.remove()
    assert shapes[0] == (3, out.prompt_length)  # one prefill per distinct prompt
    assert all(shape == (12, 1) for shape in shapes[1:]) and 1 <= len(shapes) - 1 <= 3  # then one token per step


def test_the_trainer_passes_give_the_same_log_probs_and_gradients(tmp_path, tiny_model_dir):
    """Through the trainer: the reference and old-policy passes and the micro-batched update
    (micro-batches of 3 cut across groups of 4) with and without sharing."""
    from zenalign import GRPOTrainer

    prompts = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in ["abc", "hello", "xyz", "kite"]]
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=completion_length, steps=1, group_size=4,
                          prompts_per_step=3, max_new_tokens=8, kl_coef=0.1, num_iterations=2, micro_batch_size=3,
                          progress_bar=False, output_dir=str(tmp_path / "run"), seed=0, lean_forward=False)
    trainer.setup(prompts, prompts[:1])
    rollout = trainer.sample(prompts[:3], completion_keys(seed=0, step=1, first_completion=0, count=12))
    advantages = torch.linspace(-1.5, 1.5, 12)
    weights = rollout.completion_mask / rollout.completion_mask.sum(dim=1, keepdim=True) / 12
    results = {}
    for shared in (True, False):
        # the run's update, as built from the recipe, with engine.shared_prompts set either way
        trainer.recipe.engine.shared_prompts = shared
        updater = PolicyUpdate.from_recipe(trainer.recipe, trainer.engine, trainer.dist, trainer.updater.loss)
        assert updater.share_prompts is shared
        ref_logp = updater.logprobs(trainer.reference, rollout)
        old_logp = updater.logprobs(trainer.model, rollout) + 0.05  # off pi_theta, so the ratio is not 1
        trainer.model.zero_grad(set_to_none=True)
        for rows in updater.micro_batches(len(rollout)):
            loss, _ = updater.policy_loss(rollout, rows, advantages, weights, old_logp, ref_logp)
            loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
        results[shared] = (ref_logp * rollout.completion_mask, old_logp * rollout.completion_mask, grads)
    trainer.cleanup()
    (ref_s, old_s, grads_s), (ref_p, old_p, grads_p) = results[True], results[False]
    torch.testing.assert_close(ref_s, ref_p, rtol=0, atol=2e-5)
    torch.testing.assert_close(old_s, old_p, rtol=0, atol=2e-5)
    assert max(float(g.abs().max()) for g in grads_p.values()) > 0
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()), msg=lambda m, name=name: f"{name}: {m}")


def completion_length(completions):
    return [float(len(c)) for c in completions]


def test_static_and_dynamic_decoding_caches_sample_the_same_tokens(model):
    """The preallocated cache (the default) against the growing one that models with other cache
    layouts fall back to; both are pinned to `generate` through tests/generation/test_sampling.py's check."""
    from transformers import LogitsProcessorList

    from zenalign.generation.gumbel import GumbelSampler
    from zenalign.generation.rollout import decode_groups

    encoded = byte_tokenizer()(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    keys = completion_keys(seed=2, step=1, first_completion=0, count=12)
    out = {}
    for static in (True, False):
        processors = LogitsProcessorList([GumbelSampler(keys, encoded["input_ids"].shape[1], 1.0, 0, 1.0)])
        with torch.inference_mode():
            out[static] = decode_groups(model, encoded["input_ids"], encoded["attention_mask"], 4, 9, [EOS], 0, processors,
                                      static_cache=static, lean=False)
    assert out[True].shape == (12, encoded["input_ids"].shape[1] + 9)
    assert torch.equal(out[True], out[False])


DDP_SCRIPT = r"""
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, "tests")
from helpers import build_tiny_llama
from zenalign.models.logprobs import completion_logprobs
from zenalign.train.distributed import leave_process_group

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
prompts = torch.randint(3, 300, (3, 7))
sequences = torch.cat([prompts.repeat_interleave(4, 0), torch.randint(3, 300, (12, 6))], dim=1)
mask = torch.ones_like(sequences)
mask[4:8, :2] = 0  # the second prompt is left-padded
grads, shapes = {}, []
for share in (True, False):
    model = build_tiny_llama(seed=4)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    handle = model.model.register_forward_pre_hook(lambda m, a, k: shapes.append([share, list(k["input_ids"].shape)]),
                                                   with_kwargs=True)
    logp = completion_logprobs(ddp, sequences, mask, 7, share_prompts=share)
    (logp * torch.linspace(0.5, 2.0, logp.numel()).reshape(logp.shape)).sum().backward()
    handle.remove()
    grads[share] = {n: p.grad for n, p in model.named_parameters()}
diff = max(float((grads[True][n] - grads[False][n]).abs().max() / grads[False][n].abs().max().clamp(min=1e-12))
           for n in grads[False])
print(json.dumps({"shapes": shapes, "max_relative_grad_diff": diff}))
del ddp, model  # DDP holds the group: destroyed with DDP alive, it could abort at exit (SIGABRT)
leave_process_group()
"""


def test_shared_prompts_under_distributed_data_parallel():
    """DDP (one gloo process): the prompt pass runs on the wrapped module, the completions through
    the wrapper, and the all-reduced gradients equal the plain pass's."""
    import json
    import socket
    import subprocess
    import sys

    from helpers import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    done = subprocess.run([sys.executable, "-c", DDP_SCRIPT, port], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [[True, [3, 7]], [True, [12, 5]], [False, [12, 13]]]
    assert result["max_relative_grad_diff"] < 1e-4


def test_a_sliding_window_model_takes_the_plain_pass_without_a_prompt_pass():
    """Caches that cannot be gathered are recognised from the model's config, before any work."""
    model = build_tiny_causal_lm("qwen2", seed=0, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    sequences = torch.cat([torch.randint(3, 300, (2, 6)).repeat_interleave(3, 0), torch.randint(3, 300, (6, 5))], dim=1)
    mask = torch.ones_like(sequences)
    shapes, handle = record_base_inputs(model)
    try:
        with torch.no_grad():
            completion_logprobs(model, sequences, mask, 6)
    finally:
        handle.remove()
    assert shapes == [(6, 11)]
