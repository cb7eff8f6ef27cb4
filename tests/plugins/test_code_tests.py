"""The code_tests reward source: the fraction of a record's tests the completion's program passes,
for each form of tests, worked out by hand."""

from __future__ import annotations

import pytest

from zenalign.plugins import ScoreBatch, collect_registry

ADD = "```python\ndef add(a, b):\n    return a + b\n```"
SUB = "def add(a, b):\n    return a - b\n"  # no fence: the whole completion is the program


def reward(**options):
    entry = collect_registry().get("reward", "code_tests")
    return entry.build(entry.options(**{"sandbox": {"timeout_s": 5, "cpu_s": 5}, **options}))


def batch(completions, tests, field="tests"):
    return ScoreBatch(prompts=["p"] * len(completions), completions=completions, columns={field: tests},
                      completion_ids=[()] * len(completions), group_size=len(completions), step=1)


def test_assert_statements_score_the_fraction_that_pass():
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(2, 2) == 4"]
    source = reward()
    # add passes all 3; a - b passes only add(0, 0) == 0: 1/3; a syntax error: 0
    scores = source.score(batch([ADD, SUB, "def add(a, b) return"], [tests] * 3))
    assert scores == [1.0, pytest.approx(1 / 3), 0.0]
    assert source.metrics() == {"runs": 3.0, "timeouts": 0.0, "killed": 0.0}


def test_a_program_that_prints_pass_lines_or_hangs_gets_no_credit_for_them():
    tests = ["assert add(1, 1) == 2", "assert add(2, 3) == 5"]
    forger = "def add(a, b):\n    return 0\nfor i in range(2):\n    print('deadbeef %d pass' % i)\n"
    hangs_in_test_2 = "def add(a, b):\n    if a == 2:\n        while True: pass\n    return a + b\n"
    source = reward(sandbox={"timeout_s": 2, "cpu_s": 5})
    assert source.score(batch([forger, hangs_in_test_2], [tests] * 2)) == [0.0, 0.5]  # test 1 passed before the hang
    assert source.metrics()["timeouts"] == 1.0


def test_input_output_cases_run_the_program_once_each():
    cases = [{"input": "2 3\n", "output": "5"}, {"input": "10 -4\n", "output": "6\n"}, {"input": "1 1", "output": "3"}]
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    scores = reward().score(batch([program, "print(5)", "raise SystemExit(1)"], [cases] * 3))
    assert scores == [pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0]


def test_a_test_program_scores_one_when_it_runs_to_the_end_and_a_record_without_tests_abstains():
    check = "def check(f):\n    assert f(2, 2) == 4\ncheck(add)\n"
    assert reward().score(batch([ADD, SUB, ADD], [check, check, None])) == [1.0, 0.0, None]
    assert reward(tests_field="cases").score(batch([ADD], [[]], field="cases")) == [None]  # an empty list too
