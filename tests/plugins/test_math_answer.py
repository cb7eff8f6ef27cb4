"""math_answer: the final answer (last balanced \\boxed{}, else last number) checked against the
record's reference with math-verify, on hand-picked pairs that are equal as values and pairs that
only look close."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import RECIPES, REPO
from zenalign.errors import RecipeError
from zenalign.plugins import ScoreBatch
from zenalign_plugins.math_answer import MathAnswer, MathAnswerOptions, final_answer, last_boxed


def scores(pairs, **options) -> list:
    """math_answer's score of each (completion, reference) pair."""
    batch = ScoreBatch(prompts=[""] * len(pairs), completions=[c for c, _ in pairs],
                       columns={"answer": [r for _, r in pairs]})
    return MathAnswer(MathAnswerOptions(**options)).score(batch)


def test_the_final_answer_is_the_last_balanced_box_else_the_last_number():
    assert last_boxed(r"\boxed{\frac{1}{2}} then \boxed{\sqrt{\{x\}}}") == r"\sqrt{\{x\}}"
    assert last_boxed(r"\boxed{3} and \boxed{4") == "3"  # the last box never closes: the one before
    assert last_boxed(r"\boxed {7}") == "7"
    assert last_boxed("no box") is None
    assert final_answer(r"so \boxed{12} (about 11.9)") == ("boxed", "12")
    assert final_answer("from 3 apples to -1,234.5 pears") == ("number", "-1,234.5")
    assert final_answer("half: 1 / 2") == ("number", "1 / 2")
    assert final_answer("x = 5-3 = 2.") == ("number", "2")
    assert final_answer("no answer at all") is None


EQUAL = [
    (r"\boxed{\frac{1}{2}}", "0.5"),                  # a fraction and its decimal
    (r"the answer is 1/2", r"\frac{1}{2}"),           # a plain fraction, unboxed
    ("0.5", "1/2"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12"),             # \dfrac and brace-less \frac
    (r"\boxed{\frac{2}{4}}", "0.5"),                  # not in lowest terms
    (r"\boxed{\left(1, 2\right)}", "(1,2)"),          # \left( \right)
    (r"\boxed{\sqrt{4}}", "2"),                       # evaluated
    (r"\boxed{5 \text{ cm}}", "5"),                   # units are dropped
    (r"it is 5 cm", r"5\text{ cm}"),
    (r"\boxed{5 \text{ m}}", r"5 \text{ cm}"),        # ... whichever unit it is
    (r"\boxed{\{2, 1\}}", r"\{1,2\}"),                # sets ignore order
    (r"\boxed{[0, 1)}", "[0,1)"),                     # intervals
    (r"\boxed{x+1}", "1+x"),                          # symbolic
    (r"\boxed{10\%}", "0.1"),                         # percent
    ("1,000 apples", "1000"),                         # thousands separators
    (r"\boxed{0.3333333}", r"\frac{1}{3}"),           # equal after rounding to 6 places
    (r"\boxed{3.0}", "3"),
    (r"\boxed{(1, 2)}", r"\{1, 2\}"),                 # math-verify: (1, 2) may be a pair, compared as one
]

NOT_EQUAL = [
    (r"\boxed{[0, 1]}", "[0,1)"),                     # a closed end
    (r"\boxed{0.50001}", r"\frac{1}{2}"),
    (r"\boxed{0.333}", r"\frac{1}{3}"),               # 3 places only
    (r"\boxed{3.14159}", r"\pi"),                     # pi to 6 places is 3.141593
    (r"\boxed{\sqrt{2}}", "1.414"),
    ("x = 12", "21"),                                 # digits swapped
    ("-2", "2"),                                      # the sign
    (r"\boxed{\frac{1}{2}} and then 7", "7"),         # the box wins over a later number
    (r"\boxed{[1, 2]}", r"\{1, 2\}"),                 # a closed interval is not the set of its ends
]


def test_equal_values_score_one():
    assert scores(EQUAL) == [1.0] * len(EQUAL)


def test_answers_that_only_look_close_score_zero():
    assert scores(NOT_EQUAL) == [0.0] * len(NOT_EQUAL)


def test_no_answer_scores_zero_and_no_reference_abstains():
    pairs = [("I do not know", "3"), (r"\boxed{}", "3"), ("3", None), ("3", ["4", "3"]), ("4", ["5", "6"])]
    assert scores(pairs) == [0.0, 0.0, None, 1.0, 0.0]  # a list of references: any of them
    batch = ScoreBatch(prompts=[""], completions=["3"], columns={})
    assert MathAnswer(MathAnswerOptions()).score(batch) == [None]  # records without the field


def test_the_options_reach_math_verify():
    close = [(r"\boxed{0.333}", r"\frac{1}{3}")]
    assert scores(close) == [0.0]
    assert scores(close, float_rounding=2) == [1.0]  # 0.33 == 0.33
    named = [(r"\boxed{y+1}", "x+1")]
    assert scores(named) == [0.0]
    assert scores(named, strict=False) == [1.0]  # variables matched by position
    answer = MathAnswer(MathAnswerOptions(answer_field="solution", answer_timeout_s=None))
    assert answer.reads_fields == ("solution",)
    batch = ScoreBatch(prompts=[""], completions=[r"\boxed{2}"], columns={"solution": [r"$\sqrt{4}$"]})
    assert answer.score(batch) == [1.0]


def test_without_math_verify_validate_says_which_extra_to_install(tmp_path):
    (tmp_path / "math_verify.py").write_text("raise ImportError('math-verify is hidden in this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "zenalign", "validate", str(RECIPES / "quickstart.yaml"),
                           "rewards=[{type: math_answer}]"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"zenalign: error: {RECIPES / 'quickstart.yaml'}: rewards[0] (math_answer): math_answer needs the math-verify "
        f"library: pip install 'zenalign[math]'")


def test_bad_options_name_the_field():
    with pytest.raises(Exception, match="float_rounding"):
        MathAnswerOptions(float_rounding=-1)
    from zenalign.recipe.loader import validate_recipe

    with pytest.raises(RecipeError, match=r"rewards\[0\]\.answer_feild: unknown field"):
        validate_recipe({"rewards": [{"type": "math_answer", "answer_feild": "x"}]}, source="r.yaml",
                        base_dir=Path.cwd(), name="r")
