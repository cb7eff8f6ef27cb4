"""Evaluation with k samples per prompt (run.eval_k): the pass@k estimator, the majority vote and
their per-prompt table on samples fixed by hand, the options' errors, and real runs that log them."""

import json
import math
import re

import pytest
import torch

from helpers import RECIPES, run_cli
from zenalign.errors import RecipeError
from zenalign.grpo.metrics import extract_answer, k_sample_metrics, majority_vote, pass_at_k
from zenalign.recipe.loader import load_recipe


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 1, 4) == pytest.approx(0.8)  # 1 - C(4,4)/C(5,4) = 1 - 1/5
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 is the share correct
    assert pass_at_k(8, 0, 4) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(10, 3, 8) == 1.0  # 7 wrong ones cannot fill 8 draws
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)  # C(999,500)/C(1000,500) = 500/1000, no overflow
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_majority_vote_and_its_tie_rule():
    assert majority_vote(["a", "b", "b", "c"]) == 1  # "b" twice: its first sample
    assert majority_vote(["a", "b", "b", "a"]) == 0  # a tie goes to the answer given first
    assert majority_vote(["b", "a", "a", "b"]) == 0
    assert majority_vote([None, "x", None, "y", "y"]) == 3  # no answer, no vote
    assert majority_vote([None, None]) is None and majority_vote([]) is None


def test_extract_answer():
    boxed = re.compile(r"\\boxed\{([^}]*)\}")
    assert extract_answer(r"so \boxed{3} or rather \boxed{4}.", boxed) == "4"  # the last match, its group
    assert extract_answer("no box here", boxed) is None
    assert extract_answer("  cba \n", None) == "cba" and extract_answer("  ", None) is None
    assert extract_answer("answer: 12 then 13", re.compile(r"\d+")) == "13"  # no group: the whole match


def test_k_sample_metrics_on_fixed_samples():
    """Two prompts of n = 4 samples. Prompt 0: answers a, b, b, a with a right (c = 2); prompt 1:
    x, y, y, y with x right (c = 1)."""
    correct = torch.tensor([[True, False, False, True], [True, False, False, False]])
    answers = [["a", "b", "b", "a"], ["x", "y", "y", "y"]]
    table = k_sample_metrics(correct, answers, [1, 2, 4])
    # columns: pass@1, pass@2, pass@4, maj@1, maj@2, maj@4
    assert table[0].tolist() == pytest.approx([0.5, 1 - 1 / 6, 1.0, 1.0, 1.0, 1.0])  # maj: ties go to "a"
    assert table[1].tolist() == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0, 0.0])  # maj@2 tie x/y -> x; maj@4 -> y


def test_eval_k_beyond_the_samples_is_one_line():
    with pytest.raises(RecipeError, match=r"run: eval_k: k = 8 needs at least 8 samples per prompt but "
                                          r"run.eval_group_size is 4; raise eval_group_size to 8 or drop that k"):
        load_recipe(RECIPES / "quickstart.yaml", ["run.eval_group_size=4", "run.eval_k=[1, 8]"])
    with pytest.raises(RecipeError, match=r"run.eval_answer_pattern: .*not a valid regular expression"):
        load_recipe(RECIPES / "quickstart.yaml", ["run.eval_answer_pattern=(unclosed"])


def eval_lines(tmp_path, *overrides):
    out = tmp_path / "run"
    done = run_cli("run", str(RECIPES / "quickstart.yaml"), "run.steps=1", "data.eval_size=24", "run.eval_group_size=4",
                   "run.eval_k=[1, 2, 4]", f"run.output_dir={out}", "-q", *overrides)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_logs_pass_at_k_and_maj_at_k(tmp_path):
    """At temperature 1: pass@1 is the sampled mean reward (exact_answer scores 0 or 1), pass@k grows
    with k, and every figure is a share of the 24 prompts."""
    lines = eval_lines(tmp_path)
    for line in lines:
        ks = [line[f"eval/sampled/pass@{k}"] for k in (1, 2, 4)]
        assert ks[0] == pytest.approx(line["eval/sampled/reward_mean"])
        assert ks[0] <= ks[1] <= ks[2] <= 1
        for k in (1, 2, 4):
            assert 0 <= line[f"eval/sampled/maj@{k}"] <= 1 and (line[f"eval/sampled/maj@{k}"] * 24) % 1 == pytest.approx(0)
        assert line["eval/sampled/maj@1"] <= ks[2]  # a right majority needs a right sample
    assert len(lines) == 2 and all(line["eval/sampled/pass@4"] > line["eval/sampled/pass@1"] for line in lines)


@pytest.mark.slow
def test_eval_temperature_near_zero_samples_the_greedy_answer(tmp_path):
    """run.eval_temperature 1e-6 makes every sample the greedy completion: pass@k and maj@k all equal
    greedy accuracy (at the recipe's temperature 1 they would not)."""
    for line in eval_lines(tmp_path, "run.eval_temperature=1e-6"):
        greedy = line["eval/reward_mean/accuracy"]
        for k in (1, 2, 4):
            assert line[f"eval/sampled/pass@{k}"] == pytest.approx(greedy)
            assert line[f"eval/sampled/maj@{k}"] == pytest.approx(greedy)


@pytest.mark.slow
def test_one_sample_per_prompt_is_sampled_not_greedy(tmp_path):
    """run.eval_group_size 1 with eval_k [1]: the one completion per prompt is sampled (at temperature
    1 the quickstart's policy samples right reversals that its greedy echo misses), so pass@1 = maj@1 =
    the sampled mean, above greedy accuracy at step 0."""
    out = tmp_path / "run"
    done = run_cli("run", str(RECIPES / "quickstart.yaml"), "run.steps=1", "data.eval_size=24", "run.eval_group_size=1",
                   "run.eval_k=[1]", f"run.output_dir={out}", "-q")
    assert done.returncode == 0, done.stderr
    first = json.loads((out / "eval.jsonl").read_text().splitlines()[0])
    assert first["eval/sampled/pass@1"] == first["eval/sampled/maj@1"] == pytest.approx(first["eval/sampled/reward_mean"])
    assert first["eval/sampled/pass@1"] > first["eval/reward_mean/accuracy"]
