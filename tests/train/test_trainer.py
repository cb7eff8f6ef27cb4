"""The training loop with a real tiny Llama: run directory, phases, forward passes, hooks."""

import json
import math

import pytest
import torch

import zenalign.train.build as components
import zenalign.train.update as update_module
from zenalign import GRPOTrainer, hookimpl

PROMPTS = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in ["abc", "hello", "xyz", "kite", "moon", "tree"]]
EVAL = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in ["dog", "rain"]]


def first_letter_reward(completions, answer):
    """Dense enough for a random model: 1 if the first letter is right."""
    return [float(c[:1] == a[:1]) for c, a in zip(completions, answer)]


def completion_length(completions):
    """Varies within every group of a random model, so every step has a gradient."""
    return [float(len(c)) for c in completions]


def make(tmp_path, model_dir, **options):
    settings = dict(
        reward_model=first_letter_reward, steps=2, group_size=4, prompts_per_step=2, max_new_tokens=5,
        learning_rate=1e-3, progress_bar=False, output_dir=str(tmp_path / "run"), seed=0,
    )
    settings.update(options)
    return GRPOTrainer(model=str(model_dir), **settings)


REQUIRED_METRICS = {
    "step", "samples", "reward_mean", "reward_std", "reward_mean/first_letter_reward", "loss", "kl", "clip_frac",
    "zero_std_frac", "completion_len", "completions_per_s", "time/sample", "time/score", "time/normalize",
    "time/update", "time/log",
}


def test_run_directory_holds_metrics_evals_samples_and_a_loadable_policy(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    trainer = make(tmp_path, tiny_model_dir, steps=3, log_interval=1)
    result = trainer.train(PROMPTS, EVAL)
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["samples"] for m in metrics] == [8, 16, 24]  # 2 prompts x 4 completions per step
    for m in metrics:
        assert REQUIRED_METRICS <= set(m), REQUIRED_METRICS - set(m)
        assert "time/reference" in m  # kl_coef 0.01 by default
        assert all(v is None or not (isinstance(v, float) and math.isnan(v)) for v in m.values())
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3]
    assert "eval/reward_mean/first_letter_reward" in evals[0]
    assert result.initial_eval == evals[0] and result.final_eval == evals[1]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "rewards", "advantage"} <= set(next(s for s in samples if "advantage" in s))
    loaded = AutoModelForCausalLM.from_pretrained(run / "final")
    for (name, a), b in zip(trainer.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert (run / "final" / "model.safetensors").is_file() and (run / "recipe.yaml").is_file()


def count_calls(monkeypatch, name, module=update_module):
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_reference_is_not_loaded_when_kl_coef_is_zero(tmp_path, tiny_model_dir, monkeypatch):
    loads = count_calls(monkeypatch, "load_causal_lm", components)
    trainer = make(tmp_path, tiny_model_dir, kl_coef=0.0, steps=1)
    trainer.train(PROMPTS)
    assert len(loads) == 1 and trainer.reference is None
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert "time/reference" not in metrics and metrics["kl"] == 0.0


@pytest.mark.parametrize("iterations, expected", [(1, [True]), (3, [False, True, True, True])])
def test_old_logprobs_are_computed_once_per_generation(tmp_path, tiny_model_dir, monkeypatch, iterations, expected):
    forwards = count_calls(monkeypatch, "completion_logprobs")
    make(tmp_path, tiny_model_dir, reward_model=completion_length, kl_coef=0.0, steps=1, num_iterations=iterations).train(PROMPTS)
    # mu = 1: one forward with gradient (old = its detached copy). mu = 3: one no-grad forward for
    # pi_old, then one forward with gradient per pass.
    assert forwards == expected
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    if iterations == 1:
        assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0
    else:
        assert metrics["ratio_mean"] != 1.0  # passes 2 and 3 see a policy that has moved


def test_micro_batches_give_the_same_update(tmp_path, tiny_model_dir):
    results = []
    for micro in (None, 3):
        trainer = make(tmp_path / str(micro), tiny_model_dir, reward_model=completion_length, steps=1,
                       micro_batch_size=micro, loss_aggregation="dapo")
        trainer.train(PROMPTS)
        results.append((trainer.model.state_dict(), json.loads((tmp_path / str(micro) / "run" / "metrics.jsonl").read_text())))
    (full, full_metrics), (split, split_metrics) = results
    assert full_metrics["loss"] == pytest.approx(split_metrics["loss"], abs=1e-6)
    assert full_metrics["grad_norm"] == pytest.approx(split_metrics["grad_norm"], rel=1e-4)
    for name in full:
        # AdamW's first step is lr * g / (|g| + eps): where |g| is near eps (1e-8) it magnifies the
        # summation-order rounding of g (1e-13) to about 1e-6 of the 1e-3 step
        assert torch.allclose(full[name], split[name], atol=5e-6), (name, float((full[name] - split[name]).abs().max()))


def test_rows_that_move_leaves_out_zero_advantage_rows_but_never_a_whole_micro_batch():
    advantages = torch.tensor([0.0, 0.7, 0.0, -0.7, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0],
                         [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    kept, skipped = update_module.rows_that_move([slice(0, 4), slice(4, 8), slice(8, 10)], advantages, mask)
    # first batch: row 0 stays (the first row), row 2 goes; second: all zero, row 4 stays alone;
    # third: nothing to leave out, the slice itself
    assert [k.tolist() for k in kept[:2]] == [[0, 1, 3], [4]] and kept[2] == slice(8, 10)
    assert skipped == 1 + 3 + 1 + 4  # the tokens of rows 2, 5, 6 and 7


def same_for_some_prompts(prompts, completions):
    """Every completion of a prompt ending in 'e' or 'c' scores 1 (an all-zero advantage group);
    the others score their length (advantages that differ)."""
    return [1.0 if p.rstrip(":")[-1] in "ec" else float(len(c)) for p, c in zip(prompts, completions)]


@pytest.mark.parametrize("micro, aggregation", [(None, "grpo"), (3, "dapo")])
def test_zero_advantage_rows_are_left_out_of_the_update_with_the_same_result(tmp_path, tiny_model_dir, monkeypatch,
                                                                             micro, aggregation):
    """beta = 0, mu = 1: completions with advantage 0 carry no loss and no gradient, so leaving
    them out changes no parameter and no metric (weight decay still applies: every parameter
    still gets a gradient)."""
    seen = {}
    original = update_module.completion_logprobs

    def spy(model, sequences, *args, **kwargs):
        seen.setdefault(skip, []).append(sequences.shape[0])
        return original(model, sequences, *args, **kwargs)

    monkeypatch.setattr(update_module, "completion_logprobs", spy)
    results = {}
    for skip in (False, True):
        out = tmp_path / str(skip)
        trainer = make(out, tiny_model_dir, reward_model=same_for_some_prompts, kl_coef=0.0, steps=3, prompts_per_step=3,
                       micro_batch_size=micro, loss_aggregation=aggregation, weight_decay=0.1, skip_zero_advantage=skip)
        trainer.train(PROMPTS)
        results[skip] = (trainer.model.state_dict(),
                         [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()])
    (full, full_metrics), (lean, lean_metrics) = results[False], results[True]
    assert sum(seen[True]) < sum(seen[False]) == 3 * 12  # rows left out of the forward pass
    assert any(m["zero_std_frac"] > 0 for m in full_metrics)
    for a, b in zip(full_metrics, lean_metrics):
        assert a["reward_mean"] == b["reward_mean"]  # the same samples
        for key in ("loss", "grad_norm", "ratio_mean", "clip_frac"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for name in full:
        assert torch.allclose(full[name], lean[name], atol=1e-6), name


def test_a_step_where_every_advantage_is_zero_still_steps_the_optimizer(tmp_path, tiny_model_dir):
    """Nothing to learn from (one reward for all): one row still runs, so weight decay and the
    optimizer's step count move exactly as when every row runs."""
    states = []
    for skip in (False, True):
        trainer = make(tmp_path / str(skip), tiny_model_dir, reward_model=lambda completions: [1.0] * len(completions),
                       kl_coef=0.0, steps=1, weight_decay=0.5, skip_zero_advantage=skip)
        trainer.train(PROMPTS)
        states.append((trainer.model.state_dict(), trainer.engine.optimizer.state_dict()["state"]))
    (full, full_opt), (lean, lean_opt) = states
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    decayed = [n for n in full if not torch.equal(full[n], start[n])]
    assert decayed  # weight decay moved the weights
    for name in full:
        assert torch.equal(full[name], lean[name]), name
    assert [float(s["step"]) for s in full_opt.values()] == [float(s["step"]) for s in lean_opt.values()] == [1.0] * len(full_opt)


@pytest.mark.parametrize("options", [{"kl_coef": 0.01}, {"kl_coef": 0.0, "num_iterations": 2}])
def test_zero_advantage_rows_stay_in_the_update_with_a_kl_term_or_several_iterations(tmp_path, tiny_model_dir,
                                                                                     monkeypatch, options):
    """A KL term has a gradient at advantage 0, and at mu > 1 the ratio metric of a row that
    moved is not 1: every row runs."""
    rows = []
    original = update_module.completion_logprobs

    def spy(model, sequences, *args, **kwargs):
        rows.append(sequences.shape[0])
        return original(model, sequences, *args, **kwargs)

    monkeypatch.setattr(update_module, "completion_logprobs", spy)
    make(tmp_path, tiny_model_dir, reward_model=same_for_some_prompts, steps=1, prompts_per_step=3, **options).train(PROMPTS)
    assert rows and all(n == 12 for n in rows)


def test_event_hooks_see_every_step_and_evaluation(tmp_path, tiny_model_dir, register_plugin):
    seen = []

    class Recorder:
        @hookimpl
        def zenalign_on_train_start(self, start_step):
            seen.append(("start", start_step))

        @hookimpl
        def zenalign_on_step_end(self, step, metrics):
            seen.append(("step", step, metrics["reward_mean"]))

        @hookimpl
        def zenalign_on_eval_end(self, step):
            seen.append(("eval", step))

        @hookimpl
        def zenalign_on_train_end(self, context, step):
            seen.append(("end", step, context.step))

    register_plugin(Recorder(), name="recorder")
    make(tmp_path, tiny_model_dir, steps=2).train(PROMPTS, EVAL)
    kinds = [s[0] for s in seen]
    assert kinds == ["start", "eval", "step", "step", "eval", "end"]
    assert seen[-1] == ("end", 2, 2)


def test_abstaining_rewards_never_produce_nan(tmp_path, tiny_model_dir):
    def half_abstain(completions):
        return [float("nan") if i % 2 else float(len(c)) for i, c in enumerate(completions)]

    make(tmp_path, tiny_model_dir, reward_model=half_abstain, steps=2).train(PROMPTS)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])


def test_a_reward_that_never_scores_stops_the_run(tmp_path, tiny_model_dir):
    """Issue 15, finding 8: a reward returning None for everything ran to the end "successfully".
    An objective with no score in run.hacking_patience consecutive steps is now a one-line error."""
    from zenalign.errors import RewardError

    calls = []

    def silent_after_one_step(completions):
        calls.append(1)
        return [float(len(c)) for c in completions] if len(calls) == 1 else [None] * len(completions)

    with pytest.raises(RewardError, match=r"reward_model\[0\] 'silent_after_one_step' .* scored no completion .* for "
                                          r"objective 'silent_after_one_step' in 2 consecutive steps \(steps 2-3\)"):
        make(tmp_path, tiny_model_dir, reward_model=silent_after_one_step, steps=5, hacking_patience=2).train(PROMPTS)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # steps 1 and 2 were logged


def test_the_abstention_check_can_be_turned_off(tmp_path, tiny_model_dir):
    def silent(completions):
        return [None] * len(completions)

    make(tmp_path, tiny_model_dir, reward_model=silent, steps=3, hacking_patience=0).train(PROMPTS)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
