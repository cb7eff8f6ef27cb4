"""Rollout filters (dynamic_sampling, overlong_shaping, mask_truncated and the filter protocol),
the loss mask they produce, and the entropy the update logs and grpo.top_entropy_quantile uses.
Every number is worked out by hand in the comments."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from helpers import RECIPES, captured_gradients, run_cli
from zenalign.errors import PluginError, RecipeError
from zenalign.grpo.filtering import apply_filters, select_groups
from zenalign.models.logprobs import completion_logprobs, token_entropy
from zenalign.plugins.losses import GRPOLoss, high_entropy_tokens
from zenalign.plugins import Objectives, RolloutGroups, collect_registry
from zenalign_plugins.rollout_filters import DynamicSampling, MaskTruncated

NAN = float("nan")


def groups(rewards, lengths=None, truncated=None, max_new_tokens=10) -> RolloutGroups:
    rewards = torch.tensor(rewards, dtype=torch.float64)
    if rewards.dim() == 2:
        rewards = rewards.unsqueeze(-1)
    p, g, _ = rewards.shape
    lengths = torch.tensor(lengths) if lengths is not None else torch.full((p, g), 3)
    truncated = torch.tensor(truncated) if truncated is not None else torch.zeros(p, g, dtype=torch.bool)
    return RolloutGroups(rewards=rewards, keep=torch.ones(p, dtype=torch.bool), loss_mask=torch.ones(p, g, dtype=torch.bool),
                         lengths=lengths, truncated=truncated, prompts=[f"p{i}" for i in range(p)],
                         completions=[["c"] * g for _ in range(p)], records=[{"prompt": f"p{i}"} for i in range(p)],
                         max_new_tokens=max_new_tokens, step=1)


def objectives(*names) -> Objectives:
    return Objectives(tuple(names), torch.ones(len(names), dtype=torch.float64))


def build(name, group_size=4, **options):
    registry = collect_registry()
    ftype = registry.get("filter", name)
    context = SimpleNamespace(recipe=SimpleNamespace(sampling=SimpleNamespace(max_new_tokens=10, group_size=group_size)))
    return ftype.build(ftype.options(**options), context)


def test_the_built_in_filters_are_registered_as_plugins():
    assert {"dynamic_sampling", "overlong_shaping", "mask_truncated"} <= set(collect_registry().names("filter"))


# ---------------------------------------------------------------------------------------------- the filters

def test_dynamic_sampling_drops_the_groups_flat_on_every_objective():
    # objective a, b per completion; G = 3
    rewards = [
        [[1, 0], [1, 0], [1, 0]],      # flat on both: dropped
        [[1, 0], [1, 1], [1, 0]],      # flat on a, not on b: kept
        [[0, 2], [1, 2], [0, 2]],      # kept
        [[1, NAN], [NAN, NAN], [1, NAN]],  # a: 1, 1 (the abstention left out); b: nobody scored: dropped
        [[0, 0], [NAN, 0], [1, 0]],    # a: 0 vs 1: kept
    ]
    dynamic = build("dynamic_sampling", max_extra_rounds=2)
    assert isinstance(dynamic, DynamicSampling) and dynamic.max_extra_rounds == 2
    out = dynamic(groups(rewards), objectives("a", "b"))
    assert out.keep.tolist() == [False, True, True, False, True]
    assert torch.equal(out.rewards.nan_to_num(-9.0), groups(rewards).rewards.nan_to_num(-9.0))  # rewards untouched
    assert out.loss_mask.all()
    # an objective with weight 0 moves no advantage: a group that varies only there is flat
    only_a = Objectives(("a", "b"), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert dynamic(groups(rewards), only_a).keep.tolist() == [False, False, True, False, True]


def test_dynamic_sampling_needs_groups():
    with pytest.raises(RecipeError, match=r"needs sampling.group_size >= 2 \(got 1\)"):
        build("dynamic_sampling", group_size=1)


def test_overlong_shaping_ramps_over_the_last_cache_length_tokens():
    # L_max = 10, L_cache = 4: free up to 6 tokens, then (6 - |y|) / 4 * penalty, -penalty at 10
    shaping = build("overlong_shaping", cache_length=4, penalty=2.0)
    before = groups([[1.0, 1.0, 0.0, 0.5, NAN, 0.0]], lengths=[[5, 6, 7, 8, 9, 10]],
                    truncated=[[False] * 5 + [True]])
    out = shaping(before, objectives("acc"))
    want = [1.0, 1.0, 0.0 - 2.0 * 1 / 4, 0.5 - 2.0 * 2 / 4, NAN, 0.0 - 2.0 * 4 / 4]
    got = out.rewards[0, :, 0].tolist()
    assert all((math.isnan(w) and math.isnan(g)) or g == pytest.approx(w) for g, w in zip(got, want))
    assert before.rewards[0, 2, 0] == 0.0  # the input is not changed in place


def test_overlong_shaping_goes_to_the_objective_it_names():
    shaping = build("overlong_shaping", cache_length=2, objective="style")
    out = shaping(groups([[[1.0, 1.0], [1.0, 1.0]]], lengths=[[8, 10]]), objectives("acc", "style"))
    assert out.rewards[0].tolist() == [[1.0, 1.0], [1.0, 0.0]]  # 8 tokens: free; 10: -1 on style only
    with pytest.raises(RecipeError, match="objective 'nope' is not produced.*produced: acc, style"):
        build("overlong_shaping", cache_length=2, objective="nope")(groups([[[1.0, 1.0]]]), objectives("acc", "style"))


def test_overlong_shaping_needs_a_cache_shorter_than_max_new_tokens():
    with pytest.raises(RecipeError, match=r"cache_length \(10\) must be below sampling.max_new_tokens \(10\)"):
        build("overlong_shaping", cache_length=10)


def test_mask_truncated_takes_truncated_completions_out_of_the_loss():
    out = MaskTruncated()(groups([[1, 0, 1], [0, 0, 1]], truncated=[[False, True, False], [True, True, False]]),
                          objectives("acc"))
    assert out.loss_mask.tolist() == [[True, False, True], [False, False, True]]
    assert out.keep.all()


def test_select_groups_takes_the_first_kept_groups_in_draw_order():
    keeps = [torch.tensor([True, False, False, True]), torch.tensor([False, True, True, True])]
    chosen = select_groups(keeps, target=4)
    assert chosen.chosen == [(0, 0), (0, 3), (1, 1), (1, 2)] and not any(chosen.dropped)
    assert not chosen.is_first_round
    # too few kept after the cap: the earliest dropped groups fill the batch, marked as dropped
    short = select_groups([torch.tensor([False, True, False, False])], target=4)
    assert short.chosen == [(0, 0), (0, 1), (0, 2), (0, 3)] and short.dropped == [True, False, True, True]
    assert short.is_first_round  # the first round's batch as it was sampled


def test_a_filter_that_misbehaves_is_named():
    def raises(groups, objectives):
        raise ValueError("boom")

    def wrong_type(groups, objectives):
        return groups.keep

    def wrong_keep(groups, objectives):
        return replace(groups, keep=torch.ones(7, dtype=torch.bool))

    def infinite(groups, objectives):
        return replace(groups, rewards=groups.rewards * float("inf"))

    g, o = groups([[1, 0], [0, 0]]), objectives("acc")
    with pytest.raises(PluginError, match="rollout filter 'mine' raised ValueError: boom"):
        apply_filters([("mine", raises)], g, o)
    with pytest.raises(PluginError, match="rollout filter 'mine' returned Tensor; it must return the RolloutGroups"):
        apply_filters([("mine", wrong_type)], g, o)
    with pytest.raises(PluginError, match=r"rollout filter 'mine' returned keep of shape \(7,\).*expected \(2,\)"):
        apply_filters([("mine", wrong_keep)], g, o)
    with pytest.raises(PluginError, match="rollout filter 'mine' made rewards infinite"):
        apply_filters([("mine", infinite)], g, o)


def test_filters_run_in_the_order_listed():
    # shaping first makes the flat group informative (a truncated completion loses 1); the other order drops it
    g = groups([[1.0, 1.0]], lengths=[[3, 10]])
    shape, dynamic = build("overlong_shaping", cache_length=2), build("dynamic_sampling")
    assert apply_filters([("s", shape), ("d", dynamic)], g, objectives("acc")).keep.tolist() == [True]
    assert apply_filters([("d", dynamic), ("s", shape)], g, objectives("acc")).keep.tolist() == [False]


# ---------------------------------------------------------------------------------------------- entropy

def test_token_entropy_on_hand_made_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(1.0), math.log(3.0), -float("inf"), -float("inf")],
                            [100.0, 0.0, 0.0, 0.0]]])
    got = token_entropy(torch.log_softmax(logits, dim=-1))
    # uniform over 4: log 4; p = (1/4, 3/4, 0, 0): -(1/4 log 1/4 + 3/4 log 3/4); a near one-hot: about 0
    assert got[0, 0] == pytest.approx(math.log(4), abs=1e-6)
    assert got[0, 1] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    assert got[0, 2] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("lean", [False, True], ids=["transformers", "lean"])
def test_entropy_comes_from_the_same_logits_as_the_log_probs(model, rollout, lean):
    temperature = 0.7
    logp, entropy = completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length,
                                        temperature, lean=lean, entropy=True)
    plain = completion_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length,
                                temperature, lean=lean)
    torch.testing.assert_close(logp, plain)
    tp = rollout.prompt_length
    with torch.no_grad():
        from zenalign.models.primitives import mask_positions

        logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                       position_ids=mask_positions(rollout.attention_mask)).logits[:, tp - 1:-1].float() / temperature
    p = torch.softmax(logits, dim=-1)
    want = -(p * torch.log_softmax(logits, dim=-1)).sum(-1)
    m = rollout.completion_mask.bool()
    torch.testing.assert_close(entropy[m], want[m], rtol=1e-4, atol=1e-4)
    assert not entropy.requires_grad


@pytest.fixture(scope="module")
def model():
    from helpers import build_tiny_llama

    return build_tiny_llama(seed=3)


def test_the_threshold_is_torch_quantile_without_its_size_limit():
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for quantile in (0.0, 0.2, 0.5, 0.77, 1.0):
        _, threshold = high_entropy_tokens(values, values, quantile)
        assert threshold == pytest.approx(float(torch.quantile(values.double(), 1.0 - quantile)), abs=1e-12)


def test_high_entropy_tokens_keeps_the_top_share():
    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.7, 5.0, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    values = entropy[mask.bool()]                      # 0.1 0.5 0.9 0.3 0.7 (5.0 is padding)
    keep, threshold = high_entropy_tokens(entropy, values, quantile=0.4)
    # sorted 0.1 0.3 0.5 0.7 0.9; the 0.6 quantile sits at 0.6 * 4 = 2.4: 0.5 + 0.4 * (0.7 - 0.5) = 0.58
    assert threshold == pytest.approx(0.58)
    assert keep[0].tolist() == [0.0, 0.0, 1.0, 0.0] and keep[1, 0] == 1.0
    everything, _ = high_entropy_tokens(entropy, values, quantile=1.0)
    assert everything[mask.bool()].all()  # rho = 1 keeps every token
    top, _ = high_entropy_tokens(entropy, values, quantile=0.0)
    assert top[mask.bool()].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]  # rho = 0: only the highest


def test_top_entropy_quantile_masks_the_policy_term_and_keeps_the_kl():
    """d loss / d logp per token, by hand: inside the clip range the surrogate gives -r * A and the
    k3 KL beta * (1 - exp(ref - logp)); a low-entropy token keeps only the KL part."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.05, -1.95, -0.5]])
    ref = torch.tensor([[-1.2, -1.8, -0.7]])
    adv, beta = torch.tensor([1.5]), 0.1
    keep = torch.tensor([[1.0, 0.0, 1.0]])
    token = GRPOLoss(clip_epsilon=0.2, clip_epsilon_high=0.2, kl_coef=beta).per_token(logp, old, adv, ref_logp=ref)
    (token.loss - token.policy * (1.0 - keep)).sum().backward()
    r = [math.exp(-1.0 + 1.05), math.exp(-2.0 + 1.95), 1.0]     # all within [0.8, 1.2]
    kl_grad = [beta * (1 - math.exp(-1.2 + 1.0)), beta * (1 - math.exp(-1.8 + 2.0)), beta * (1 - math.exp(-0.7 + 0.5))]
    want = [-r[0] * 1.5 + kl_grad[0], kl_grad[1], -r[2] * 1.5 + kl_grad[2]]
    assert logp.grad[0].tolist() == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------- in the trainer

def rows_of(rollout, index):
    return replace(rollout, sequences=rollout.sequences[index], attention_mask=rollout.attention_mask[index],
                   completion_mask=rollout.completion_mask[index], truncated=rollout.truncated[index],
                   completions=[rollout.completions[i] for i in index], completion_ids=[rollout.completion_ids[i] for i in index])


@pytest.mark.parametrize("aggregation, scale", [("dapo", 1.0), ("grpo", 5 / 8)])
def test_the_loss_mask_leaves_masked_completions_out_of_the_gradient(tmp_path, tiny_model_dir, monkeypatch,
                                                                      aggregation, scale):
    """Masking 3 of 8 completions gives the gradient of the update on the other 5: the same under
    dapo (a mean over the unmasked tokens), times 5/8 under grpo (a mean over all 8 completions)."""
    from zenalign import GRPOTrainer
    from zenalign.generation.gumbel import completion_keys
    from zenalign.train.batch import StepBatch

    prompts = [{"prompt": f"reverse {w}:"} for w in ["abc", "hello"]]
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=lambda completions: [0.0] * len(completions),
                          steps=1, group_size=4, prompts_per_step=2, max_new_tokens=6, kl_coef=0.0,
                          loss_aggregation=aggregation, progress_bar=False, output_dir=str(tmp_path / "run"))
    trainer.setup(prompts, prompts[:1])
    rollout = trainer.sample(prompts, completion_keys(seed=0, step=1, first_completion=0, count=8))
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75, -0.25, 0.5, -1.5])
    loss_mask = torch.tensor([True, False, True, True, False, True, False, True])
    seen = captured_gradients(trainer, monkeypatch)
    updater = trainer.updater
    updater(StepBatch.for_update(rollout, advantages, completion_mask=loss_mask))
    kept = loss_mask.nonzero().squeeze(1).tolist()
    updater(StepBatch.for_update(rows_of(rollout, kept), advantages[kept]))
    trainer.cleanup()
    masked, subset = seen
    assert max(float(g.abs().max()) for g in subset.values()) > 0
    for name, grad in subset.items():
        torch.testing.assert_close(masked[name], grad * scale, rtol=1e-4, atol=1e-7)


def first_letter_right(completions, answer):
    return [float(c[:1] == a[:1]) for c, a in zip(completions, answer)]


def test_dynamic_sampling_in_a_run_refills_the_batch_with_informative_groups(tmp_path, tiny_model_dir, register_plugin):
    from zenalign import GRPOTrainer, NormalizerType, Options, hookimpl
    from zenalign.plugins.advantages import combine_objectives, standardize_groups

    seen = []

    class Spy:
        def __call__(self, rewards, objectives):
            seen.append(rewards.clone())
            return standardize_groups(combine_objectives(rewards, objectives.weights), 1e-6)

    class Plugin:
        @hookimpl
        def zenalign_normalizer_types(self):
            return [NormalizerType("spy", Options, Spy)]

    register_plugin(Plugin())
    words = ["abc", "hello", "xyz", "kite", "moon", "tree", "star", "lamp", "bird", "fish", "rock", "wind"]
    prompts = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in words]
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=first_letter_right, steps=3, group_size=4,
                          prompts_per_step=4, max_new_tokens=4, kl_coef=0.0, normalizer="spy", progress_bar=False,
                          filters=[{"type": "dynamic_sampling", "max_extra_rounds": 2}], eval_interval=0,
                          output_dir=str(tmp_path / "run"), seed=0)
    trainer.train(prompts, prompts[:2])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == 3
    previous_samples = 0
    for line, rewards in zip(lines, seen):
        rounds, dropped = int(line["filter/rounds"]), int(line["filter/groups_dropped"])
        assert 1 <= rounds <= 3 and line["samples"] - previous_samples == rounds * 16  # 4 prompts x 4 per round
        previous_samples = line["samples"]
        valid = ~rewards[..., 0].isnan()
        flat = torch.tensor([bool(v.sum() < 2) or bool(g[v].max() == g[v].min()) for g, v in zip(rewards[..., 0], valid)])
        filler = ~valid.any(dim=1)
        # every group trained on is informative; fillers (only when the cap was hit) come in as abstentions
        assert not (flat & ~filler).any()
        assert line["filter/groups_trained"] == 4 - int(filler.sum()) == min(rounds * 4 - dropped, 4)
        if rounds < 3:
            assert not filler.any()
    assert any(line["filter/rounds"] > 1 for line in lines)  # the reward is sparse enough to need refills
    assert all(line["entropy"] > 0 for line in lines)


QUICKSTART = str(RECIPES / "quickstart.yaml")
FILTERED = ["run.steps=4", "run.eval_interval=0", "data.eval_size=16", "run.checkpoint_interval=2", "-q",
            "filters=[{type: overlong_shaping, cache_length: 3}, {type: dynamic_sampling, max_extra_rounds: 2}, "
            "{type: mask_truncated}]", "grpo.top_entropy_quantile=0.5"]


@pytest.mark.slow
def test_a_filtered_run_resumes_exactly(tmp_path):
    """Dynamic sampling draws a different number of prompts each step; the sampler's position is in
    the checkpoint, so resuming at step 2 reproduces steps 3-4 exactly."""
    whole = tmp_path / "whole"
    done = run_cli("run", QUICKSTART, *FILTERED, f"run.output_dir={whole}")
    assert done.returncode == 0, done.stderr
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    done = run_cli("run", QUICKSTART, *FILTERED, f"run.output_dir={resumed}", "--resume",
                   str(resumed / "checkpoints" / "step-00000002"))
    assert done.returncode == 0, done.stderr

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "completions_per_s"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert lines(resumed) == lines(whole)
    assert any(line["filter/rounds"] > 1 for line in lines(whole))


def test_a_rebuilt_batch_equals_the_sampled_one(model):
    """Groups from several rounds or processes join one batch through their token rows: the
    round trip gives back the same tokens, masks, truncation flags and texts."""
    from helpers import PROMPTS, byte_tokenizer, end_some_completions_early, sample_groups
    from zenalign.generation.rollout import completion_rows, rollout_from, rollout_from_rows

    sampled = end_some_completions_early(sample_groups(model, lean_forward=False))
    rebuilt = rollout_from_rows(byte_tokenizer(), PROMPTS, completion_rows(sampled), 4, [1])
    assert torch.equal(rebuilt.sequences, sampled.sequences)
    assert torch.equal(rebuilt.attention_mask, sampled.attention_mask)
    assert torch.equal(rebuilt.completion_mask, sampled.completion_mask)
    assert torch.equal(rebuilt.truncated, sampled.truncated) and sampled.truncated.any() and not sampled.truncated.all()
    # (end_some_completions_early edits the tensors only: the texts are those of its tensors, decoded again)
    decoded = rollout_from(sampled.sequences, sampled.attention_mask[:, : sampled.prompt_length], [1], byte_tokenizer())
    assert rebuilt.completions == decoded.completions and rebuilt.completion_ids == decoded.completion_ids
    assert len(set(rebuilt.completions)) > 1


def test_the_update_masks_the_policy_term_of_low_entropy_tokens(tmp_path, tiny_model_dir, monkeypatch):
    """Through PolicyUpdate: with top_entropy_quantile 0.3 the gradient is that of a loss written
    out here, with the policy term on the top 30% of tokens by entropy and the KL term everywhere."""
    from zenalign import GRPOTrainer
    from zenalign.generation.gumbel import completion_keys
    from zenalign.plugins.losses import token_weights
    from zenalign.train.batch import StepBatch

    prompts = [{"prompt": f"reverse {w}:"} for w in ["abc", "hello"]]
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=lambda completions: [0.0] * len(completions),
                          steps=1, group_size=4, prompts_per_step=2, max_new_tokens=6, kl_coef=0.2,
                          top_entropy_quantile=0.3, progress_bar=False, output_dir=str(tmp_path / "run"))
    trainer.setup(prompts, prompts[:1])
    rollout = trainer.sample(prompts, completion_keys(seed=0, step=1, first_completion=0, count=8))
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75, -0.25, 0.5, -1.5])
    updater = trainer.updater
    ref_logp = updater.reference_logprobs(rollout)
    seen = captured_gradients(trainer, monkeypatch)
    result = updater(StepBatch.for_update(rollout, advantages, ref_logp=ref_logp))

    mask = rollout.completion_mask
    logp, entropy = updater.forward(trainer.model, rollout, slice(0, 8), entropy=True)
    keep, threshold = high_entropy_tokens(entropy.detach(), entropy.detach()[mask.bool()], 0.3)  # tested above
    assert result["entropy_threshold"] == pytest.approx(threshold, rel=1e-6)
    assert 0.2 * float(mask.sum()) < float((keep * mask).sum()) < 0.4 * float(mask.sum())
    ratio = torch.exp(logp - logp.detach())
    x = ref_logp - logp
    kl = torch.exp(x) - x - 1
    per_token = -ratio * advantages.unsqueeze(1) * keep + 0.2 * kl   # ratio 1: no clipping at mu = 1
    trainer.model.zero_grad(set_to_none=True)
    (per_token * token_weights(mask, "grpo", 6)).sum().backward()
    want = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.cleanup()
    for name, grad in want.items():
        torch.testing.assert_close(seen[0][name], grad, rtol=1e-4, atol=1e-7)
