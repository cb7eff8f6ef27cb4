"""Scoring: what reward sources may return, how plain functions are called, and the built-in
reward sources on hand-made batches."""

import math

import numpy as np
import pytest
import torch

from zenalign.errors import RewardError
from zenalign.plugins import ScoreBatch
from zenalign.plugins import collect_registry
from zenalign.grpo.scoring import Scorer, bind_reward

NAN = float("nan")


def batch(completions, answers=None, group_size=2, ids=None):
    columns = {} if answers is None else {"answer": list(answers)}
    return ScoreBatch(
        prompts=["p"] * len(completions), completions=list(completions), columns=columns,
        completion_ids=ids or [[7] * len(c) for c in completions], group_size=group_size, step=3,
    )


def reward(name, **options):
    plugin_type = collect_registry().get("reward", name)
    return plugin_type.build(plugin_type.options(**options))


def matrix(*sources, b):
    return Scorer([bind_reward(s, f"r{i}", "test") for i, s in enumerate(sources)])(b)


def test_function_gets_only_the_arguments_it_names():
    seen = {}

    def fn(completions, answer, step):
        seen.update(completions=completions, answer=answer, step=step)
        return [1.0, 0.0]

    assert matrix(fn, b=batch(["a", "b"], ["a", "x"])).tolist() == [[1.0], [0.0]]
    assert seen == {"completions": ["a", "b"], "answer": ["a", "x"], "step": 3}


def test_function_with_kwargs_gets_everything_trl_style():
    def fn(prompts, completions, **kwargs):
        assert set(kwargs) >= {"answer", "completion_ids", "group_size", "step"}
        return [len(c) for c in completions]

    assert matrix(fn, b=batch(["abc", "d"], ["x", "y"])).tolist() == [[3.0], [1.0]]


def test_completions_whose_records_lack_a_field_the_function_needs_abstain():
    """Issue 35: a function needing a field its batch lacks raised (TypeError with **kwargs) while
    validate promised it would abstain. Those completions are kept from it and abstain; it gets the
    others, whole groups, and a parameter with a default gets None where the field is missing."""
    calls = []

    def fn(completions, answer, hint=None, **kwargs):
        calls.append((completions, answer, hint, kwargs["group_size"]))
        return {"right": [float(c == a) for c, a in zip(completions, answer)], "count": [len(answer)] * len(answer)}

    fn.objectives = ["right", "count"]
    groups = batch(["a", "b", "c", "d", "e", "f"], [None, None, "c", "c", None, None], group_size=2)
    out = Scorer([bind_reward(fn, "fn", "test")])(groups)
    assert calls == [(["c", "d"], ["c", "c"], None, 2)]  # the one group whose record has an answer
    assert [["nan" if math.isnan(x) else x for x in row] for row in out.tolist()] == [
        ["nan", "nan"], ["nan", "nan"], [1.0, 2.0], [0.0, 2.0], ["nan", "nan"], ["nan", "nan"]]
    calls.clear()
    out = Scorer([bind_reward(fn, "fn", "test")])(batch(["a", "b"]))  # no record has the field: never called
    assert calls == [] and torch.isnan(out).all()


@pytest.mark.parametrize(
    "returned, expected",
    [
        ([1, True], [1.0, 1.0]),
        ([None, NAN], [NAN, NAN]),  # None and NaN both abstain
        (np.array([0.5, 2.0]), [0.5, 2.0]),
        (torch.tensor([0.25, -1.0]), [0.25, -1.0]),
        ([np.float32(1.5), torch.tensor(2.0)], [1.5, 2.0]),
    ],
)
def test_accepted_return_values(returned, expected):
    out = matrix(lambda completions: returned, b=batch(["a", "b"]))[:, 0].tolist()
    assert [("nan" if math.isnan(x) else x) for x in out] == [("nan" if math.isnan(x) else x) for x in expected]


@pytest.mark.parametrize(
    "returned, message",
    [
        ([1.0], "returned 1 scores for 2 completions; it must return one score per completion"),
        ([1.0, 2.0, 3.0], "returned 3 scores for 2 completions"),
        (["good", 1.0], "returned str 'good' for completion 0 of objective 'r0'; scores must be numbers"),
        ([1.0, "0.5"], "returned str '0.5' for completion 1 of objective 'r0'; scores must be numbers"),  # no conversion
        ([1.0, float("inf")], "returned inf for completion 1 of objective 'r0'; scores must be finite"),
        (0.5, "returned a float; it must return one score per completion"),
        (["1.5", "2"], "returned str '1.5' for completion 0 .* scores must be numbers"),  # never converted silently
        ({"x": [1.0, 1.0]}, "returned objectives \\['x'\\]; expected exactly \\['r0'\\]"),
    ],
)
def test_rejected_return_values(returned, message):
    with pytest.raises(RewardError, match=message):
        matrix(lambda completions: returned, b=batch(["a", "b"]))


def test_a_raising_reward_is_named():
    def broken(completions):
        raise ZeroDivisionError("division by zero")

    with pytest.raises(RewardError, match="reward 'r0' \\(test\\) raised ZeroDivisionError: division by zero at "
                       f"{__file__}:{broken.__code__.co_firstlineno + 1} \\(in broken\\) \\(at step 3\\)"):
        matrix(broken, b=batch(["a", "b"]))


class TwoDimensions:
    objectives = ["helpful", "harmless"]

    def score(self, b):
        return {"harmless": [1.0, NAN], "helpful": [0.0, 0.5]}


def run_objectives(rewards):
    """The run's objectives for these bound rewards, as the trainer builds them (no recipe ``objectives``)."""
    from zenalign.plugins import BuildContext
    from zenalign.recipe.loader import recipe_from_options
    from zenalign.train.build import Builder, Inputs

    loaded = recipe_from_options({}, name="test")
    return Builder(loaded, Inputs(), BuildContext(recipe=loaded.recipe, base_dir=loaded.base_dir)).objectives(rewards)


def test_multi_objective_source_columns_follow_declared_order():
    rewards = [bind_reward(TwoDimensions(), "judge", "test", weight=2.0), bind_reward(lambda completions: [3.0, 4.0], "len", "test")]
    scorer = Scorer(rewards)
    objectives = run_objectives(rewards)
    assert objectives.names == ("helpful", "harmless", "len")
    assert objectives.weights.tolist() == [2.0, 2.0, 1.0]
    out = scorer(batch(["a", "b"]))
    assert out[:, 0].tolist() == [0.0, 0.5] and out[0, 1] == 1.0 and math.isnan(out[1, 1]) and out[:, 2].tolist() == [3.0, 4.0]


def test_two_sources_with_one_objective_name_are_refused():
    with pytest.raises(RewardError, match="objective 'acc' is produced by both"):
        Scorer([bind_reward(lambda completions: [0.0], "acc", "a"), bind_reward(lambda completions: [0.0], "acc", "b")])


# ---------------------------------------------------------------------------------------- built-ins

def test_exact_answer():
    b = batch([" cba ", "abc", "CBA", "x"], ["cba", "cba", "cba", None], group_size=4)
    assert reward("exact_answer").score(b) == [1.0, 0.0, 0.0, None]  # no reference -> abstain
    assert reward("exact_answer", case_sensitive=False).score(b)[:3] == [1.0, 0.0, 1.0]
    assert reward("exact_answer", strip=False).score(b)[0] == 0.0


def test_exact_answer_extract_numeric_and_lists():
    b = batch(["so #### 4.0", "#### 3 then #### 5", "no marker", "#### 7"], ["4", "5", "1", ["6", "7"]], group_size=4)
    assert reward("exact_answer", extract=r"####\s*(\S+)", numeric=True).score(b) == [1.0, 1.0, 0.0, 1.0]
    assert reward("exact_answer", extract=r"####\s*(\S+)").score(b) == [0.0, 1.0, 0.0, 1.0]  # "4.0" != "4" as text


def test_exact_answer_without_the_field_names_it():
    with pytest.raises(RewardError, match="no field 'solution' \\(answer_field\\); fields: answer"):
        reward("exact_answer", answer_field="solution").score(batch(["a", "b"], ["a", "b"]))


def test_regex_match():
    b = batch(["<a>42</a>", "x <a>1</a>", "<A>3</A>"], group_size=3)
    assert reward("regex_match", pattern=r"<a>\d+</a>").score(b) == [1.0, 1.0, 0.0]
    assert reward("regex_match", pattern=r"<a>\d+</a>", mode="fullmatch").score(b) == [1.0, 0.0, 0.0]
    assert reward("regex_match", pattern=r"<a>\d+</a>", flags=["IGNORECASE"], match_score=2, miss_score=-1).score(b) == [2.0, 2.0, 2.0]


def test_length():
    b = batch(["abcd", "ab"], ids=[[5, 6, 7], [5]])
    assert reward("length").score(b) == [-3.0, -1.0]  # tokens, shorter preferred
    assert reward("length", prefer="longer", unit="chars", scale=0.5).score(b) == [2.0, 1.0]
    assert reward("length", target=2).score(b) == [-1.0, -1.0]


def test_python_function_by_file_path(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def shout(completions):\n    return [float(c.isupper()) for c in completions]\n")
    from zenalign.plugins import BuildContext
    from zenalign.recipe.schema import Recipe

    plugin_type = collect_registry().get("reward", "python_function")
    options = plugin_type.options(function="my_rewards.py:shout")
    source = plugin_type.build(options, BuildContext(recipe=Recipe(), base_dir=tmp_path))
    assert source.score(batch(["HI", "hi"])) == [1.0, 0.0]
    with pytest.raises(Exception, match="has no attribute 'whisper'"):
        plugin_type.build(plugin_type.options(function="my_rewards.py:whisper"), BuildContext(recipe=Recipe(), base_dir=tmp_path))
