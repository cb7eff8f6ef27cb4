"""judge_http (and constitution's remote judge) against a real HTTP server on 127.0.0.1 that speaks
the OpenAI chat/completions API and injects failures (tests/openai_server.py).

Every failure ends in bounded time: timeouts here are a fraction of a second, and each test
checks how long it took. The failure table of docs/rewards.md is these tests:

| failure | what happens | test |
|---|---|---|
| HTTP 500, then an answer | retried with backoff, scored | test_http_500_is_retried_then_scored |
| HTTP 429 with Retry-After | waits that long (at most max_backoff_s), retried | test_429_waits_for_retry_after_capped_by_max_backoff |
| no answer within request_timeout_s | retried, then abstains | test_a_timeout_is_retried_then_abstains |
| fail_after failed requests in a row | one-line error naming the reward | test_failures_in_a_row_stop_with_one_line |
| a reply that is not JSON / no choices | abstains, not retried | test_a_malformed_reply_abstains_without_a_retry |
| a reply with no number / no yes-no token | abstains (no_score) | test_text_score_*, test_logprobs_score_* |
| HTTP 400 (e.g. input too long) | abstains, not retried | test_a_400_abstains_and_a_404_stops_at_once |
| HTTP 401/403/404 (key, model, URL) | one-line error at once | test_a_400_abstains_and_a_404_stops_at_once |
| a slow server | at most max_concurrency in flight | test_requests_in_flight_never_exceed_max_concurrency |
| a call past the entry's timeout_s | one-line error naming the reward | test_the_entrys_timeout_s_interrupts_a_judge_waiting_on_its_server |
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import RECIPES, REPO
from openai_server import JudgeServer, logprobs, raw, reply, slow, status
from zenalign.errors import RecipeError, RewardError
from zenalign.plugins import BuildContext, ScoreBatch
from zenalign.plugins.judge_client import JudgeStats, retry_after_s
from zenalign.recipe.loader import validate_recipe
from zenalign.recipe.schema import Recipe
from zenalign_plugins.judge_http import JudgeHTTP

FAST = {"backoff_s": 0.01, "request_timeout_s": 2.0}


def entry(server: JudgeServer, **options):
    """The validated recipe entry of a judge_http reward named 'judge' (as a run builds it)."""
    data = {"rewards": [{"type": "judge_http", "name": "judge", "base_url": server.base_url, "model": "judge-7b",
                         **FAST, **options}]}
    return validate_recipe(data, source="r.yaml", base_dir=Path.cwd(), name="r").recipe.rewards[0]


def build(server: JudgeServer, run_dir: Path | None = None, **options) -> JudgeHTTP:
    context = BuildContext(recipe=Recipe(), base_dir=Path.cwd(), output_dir=run_dir)
    return JudgeHTTP(entry(server, **options), context)


def batch(*completions: str, **columns) -> ScoreBatch:
    n = len(completions)
    return ScoreBatch(prompts=["what is 2+2?"] * n, completions=list(completions),
                      columns={k: list(v) for k, v in columns.items()}, group_size=n)


@pytest.fixture
def server():
    with JudgeServer() as running:
        yield running


# ---------------------------------------------------------------------------------------------- scores

def test_text_score_is_the_first_number_scaled_from_the_range(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret-123")
    replies = {"four": "Score: 7/10", "five": "15", "six": "I cannot rate this.", "seven": "2.5"}
    server.answer = lambda body: reply(replies[body["messages"][-1]["content"].split("|")[1]])
    judge = build(server, api_key_env="JUDGE_KEY", system="You are a strict grader.", score_range=[0, 10],
                  template="{prompt}|{completion}|{answer}")
    scores = judge.score(batch("four", "five", "six", "seven", answer=["4"] * 4))
    assert scores == [0.7, None, None, 0.25]  # 7 of 0..10; 15 is outside the range; no number; 2.5
    [first] = [r for r in server.requests if "|four|" in r["body"]["messages"][-1]["content"]]  # sent concurrently
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer secret-123"
    assert first["body"] == {"model": "judge-7b", "temperature": 0.0, "max_tokens": 16, "messages": [
        {"role": "system", "content": "You are a strict grader."},
        {"role": "user", "content": "what is 2+2?|four|4"}]}
    metrics = judge.metrics()
    assert {k: metrics[k] for k in ("requests", "retries", "errors", "no_score", "cache_hits")} == {
        "requests": 4.0, "retries": 0.0, "errors": 0.0, "no_score": 2.0, "cache_hits": 0.0}
    assert 0 < metrics["latency_mean_s"] <= metrics["latency_p95_s"] < 2.0
    assert judge.metrics() == {"requests": 0.0, "retries": 0.0, "errors": 0.0, "no_score": 0.0, "cache_hits": 0.0}


def test_logprobs_score_is_p_yes_over_p_yes_plus_p_no(server):
    answers = {"good": logprobs({" Yes": 0.6, "yes": 0.1, "No": 0.2, "Maybe": 0.1}),
               "bad": logprobs({"No": 0.9, " Yes": 0.05}),
               "odd": logprobs({"Maybe": 0.7, "Perhaps": 0.3})}
    server.answer = lambda body: answers[body["messages"][-1]["content"]]
    judge = build(server, score="logprobs", template="{completion}")
    scores = judge.score(batch("good", "bad", "odd"))
    assert scores[0] == pytest.approx((0.6 + 0.1) / (0.6 + 0.1 + 0.2))  # " Yes" and "yes" are both yes
    assert scores[1] == pytest.approx(0.05 / 0.95)
    assert scores[2] is None  # neither answer among the alternatives: abstain
    good = [r["body"] for r in server.requests if r["body"]["messages"][-1]["content"] == "good"]  # sent concurrently:
    assert good == [{"model": "judge-7b", "temperature": 0.0, "max_tokens": 1, "logprobs": True,    # in any order
                     "top_logprobs": 20, "messages": [{"role": "user", "content": "good"}]}]
    assert judge.metrics()["no_score"] == 1.0


def test_the_built_in_rubrics_name_the_range_and_the_answers(server):
    text = build(server).template
    assert "from 0 (useless, wrong or harmful) to 10 (excellent)" in text and "{prompt}" in text and "{completion}" in text
    assert "from 1 (useless" in build(server, score_range=[1, 5]).template
    assert build(server, score="logprobs", yes="y", no="n").template.endswith("Answer y or n.")


def test_records_lacking_a_template_field_abstain_without_a_request(server):
    server.answer = lambda body: reply("10")
    judge = build(server, template="{completion} vs {answer}")
    assert judge.reads_fields == ("answer",)
    assert judge.score(batch("a", "b", answer=["x", None])) == [1.0, None]
    assert judge.score(batch("c")) == [None]  # no record has the field
    assert server.bodies() == [{"model": "judge-7b", "temperature": 0.0, "max_tokens": 16,
                                "messages": [{"role": "user", "content": "a vs x"}]}]


# ---------------------------------------------------------------------------------------------- failures

def test_http_500_is_retried_then_scored(server):
    server.script = [status(500), status(503, "overloaded")]
    server.answer = lambda body: reply("8")
    judge = build(server, max_retries=3)
    assert judge.score(batch("four")) == [0.8]
    assert len(server.requests) == 3
    metrics = judge.metrics()
    assert (metrics["requests"], metrics["retries"], metrics["errors"]) == (1.0, 2.0, 0.0)


def test_429_waits_for_retry_after_capped_by_max_backoff(server):
    server.answer = lambda body: reply("6")
    server.script = [status(429, headers={"Retry-After": "1"})]
    judge = build(server, backoff_s=0.0)
    started = time.monotonic()
    assert judge.score(batch("four")) == [0.6]
    assert 1.0 <= time.monotonic() - started < 3.0  # the server's second, not backoff_s
    server.script = [status(429, headers={"Retry-After": "100"})]
    started = time.monotonic()
    assert build(server, backoff_s=0.0, max_backoff_s=0.2).score(batch("five")) == [0.6]
    assert time.monotonic() - started < 2.0
    assert retry_after_s("2.5") == 2.5 and retry_after_s("soon") is None and retry_after_s(None) is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


def test_a_timeout_is_retried_then_abstains(server):
    server.answer = lambda body: slow(3.0, reply("9"))
    judge = build(server, request_timeout_s=0.2, max_retries=1)
    started = time.monotonic()
    assert judge.score(batch("four")) == [None]
    assert time.monotonic() - started < 2.5  # two tries of 0.2 s and a 0.01 s backoff, not the server's 3 s
    assert len(server.requests) == 2
    metrics = judge.metrics()
    assert (metrics["requests"], metrics["retries"], metrics["errors"]) == (1.0, 1.0, 1.0)
    assert "latency_mean_s" not in metrics  # nothing was answered


def test_failures_in_a_row_stop_with_one_line(server):
    server.answer = lambda body: slow(3.0, reply("9"))
    judge = build(server, request_timeout_s=0.2, max_retries=0, fail_after=3)
    started = time.monotonic()
    assert judge.score(batch("a", "b")) == [None, None]  # two in a row: still under fail_after
    with pytest.raises(RewardError) as caught:
        judge.score(batch("c"))  # the third in a row, in the next call
    assert time.monotonic() - started < 2.5
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"judge_http 'judge': 3 judge requests in a row failed (fail_after); the last: no answer within "
                       f"request_timeout_s (0.2 s) (after 0 retries). Check the server at {server.base_url}, or raise "
                       f"fail_after to abstain on more failures")
    server.answer = lambda body: reply("9")
    judge = build(server, max_retries=0, fail_after=2)
    server.script = [status(500)]
    assert judge.score(batch("d")) == [None]
    assert judge.score(batch("e")) == [0.9]  # an answer resets the count
    server.script = [status(500)]
    assert judge.score(batch("f")) == [None]


def test_the_entrys_timeout_s_interrupts_a_judge_waiting_on_its_server(server):
    """The reward's own deadline (rewards[].timeout_s) reaches the call waiting on the pool."""
    from zenalign.grpo.scoring import Scorer, bind_reward

    server.answer = lambda body: slow(3.0, reply("9"))
    scorer = Scorer([bind_reward(build(server, request_timeout_s=30), "judge", "judge_http", timeout_s=0.5)])
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"'judge' \(judge_http\) took longer than its timeout_s \(0\.5 s\)"):
        scorer(batch("four"))
    assert time.monotonic() - started < 2.0


def test_a_malformed_reply_abstains_without_a_retry(server):
    server.script = [raw(b'{"choices": [{"message": '), ("json", 200, {"object": "error"}, {})]
    judge = build(server, max_retries=3)
    assert judge.score(batch("four", "five")) == [None, None]
    assert len(server.requests) == 2
    metrics = judge.metrics()
    assert (metrics["errors"], metrics["retries"]) == (2.0, 0.0)


def test_a_400_abstains_and_a_404_stops_at_once(server):
    server.script = [status(400, "This model's maximum context length is 2048 tokens")]
    judge = build(server, max_retries=3)
    assert judge.score(batch("four")) == [None]
    assert len(server.requests) == 1
    server.script = [status(404, "The model `judge-7b` does not exist.")]
    with pytest.raises(RewardError, match=r"^judge_http 'judge': the judge at http://127\.0\.0\.1:\d+/v1/chat/completions "
                                          r"refused the request: HTTP 404: .*does not exist.*; check base_url, model and "
                                          r"api_key_env$"):
        judge.score(batch("five"))
    assert len(server.requests) == 2


def test_requests_in_flight_never_exceed_max_concurrency(server):
    server.answer = lambda body: slow(0.2, reply("5"))
    completions = [f"answer {i}" for i in range(12)]
    started = time.monotonic()
    assert build(server, max_concurrency=3).score(batch(*completions)) == [0.5] * 12
    elapsed = time.monotonic() - started
    assert server.max_in_flight == 3  # measured by the server
    assert 0.8 <= elapsed < 3.0  # 4 rounds of 3, 0.2 s each
    server.max_in_flight = 0
    assert build(server, max_concurrency=1).score(batch("x", "y", "z")) == [0.5] * 3
    assert server.max_in_flight == 1


# ---------------------------------------------------------------------------------------------- the cache

def test_the_cache_answers_repeats_and_survives_a_new_judge_on_the_run_directory(server, tmp_path):
    server.answer = lambda body: reply(str(len(body["messages"][-1]["content"])))
    run = tmp_path / "run"
    judge = build(server, run, template="{completion}")
    assert judge.score(batch("abc", "abcd", "abc")) == [0.3, 0.4, 0.3]
    assert len(server.requests) == 2  # the repeated completion was asked once
    assert judge.score(batch("abcd", "abc")) == [0.4, 0.3]
    assert len(server.requests) == 2
    assert judge.metrics()["cache_hits"] == 3.0
    cache_file = run / "reward-cache" / "judge.rank0.jsonl"
    assert len(cache_file.read_text().splitlines()) == 2
    again = build(server, run, template="{completion}")  # a resumed run: a new object on the same directory
    assert again.score(batch("abc", "abcd")) == [0.3, 0.4]
    assert len(server.requests) == 2
    assert build(server, run, template="{completion}!").score(batch("abc")) == [0.4]  # another rubric: asked again
    assert build(server, run, template="{completion}", model="other").score(batch("abc")) == [0.3]
    assert len(server.requests) == 4
    with cache_file.open("a") as f:
        f.write('{"key": "cut sh')  # a process killed mid-line
    later = build(server, run, template="{completion}")
    assert later.score(batch("abcde", "abc")) == [0.5, 0.3]
    assert build(server, run, template="{completion}").score(batch("abcde")) == [0.5]  # its line is readable
    assert len(server.requests) == 5
    assert build(server, run, template="{completion}", cache=False).score(batch("abc")) == [0.3]
    assert len(server.requests) == 6


def test_a_replaced_run_loses_its_caches_and_keeps_files_zenalign_did_not_write(tmp_path):
    from zenalign.train.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.prepare(overwrite=False)
    (tmp_path / "run" / "reward-cache").mkdir()
    (tmp_path / "run" / "reward-cache" / "judge.rank0.jsonl").write_text('{"key": "k", "score": 0.5}\n')
    (tmp_path / "run" / "reward-cache" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "reward-cache" / "notes.jsonl").write_text("mine too\n")  # not a cache's name
    run.prepare(overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run" / "reward-cache").iterdir()) == ["notes.jsonl", "notes.txt"]


def test_latency_p95_is_the_nearest_rank():
    stats = JudgeStats(latencies=[float(v) for v in range(20, 0, -1)])
    report = stats.report()
    assert report["latency_mean_s"] == 10.5 and report["latency_p95_s"] == 19.0  # rank ceil(0.95 * 20) = 19
    assert JudgeStats(latencies=[0.3]).report()["latency_p95_s"] == 0.3


# ---------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("options, expected", [
    ({"api_key_env": "sk-abc123"}, "rewards[0].api_key_env: give the name of an environment variable that holds the key"),
    ({"base_url": "localhost:8000/v1"}, "rewards[0].base_url: 'localhost:8000/v1' is not an http:// or https:// URL"),
    ({"template": "{0} and {completion}"}, "{0} is not a field name"),
    ({"template": "{completion"}, "not a valid template"),
    ({"score_range": [5, 5]}, "score_range: [5, 5] is empty"),
    ({"score": "stars"}, "rewards[0].score"),
    ({"yes": "y", "no": " Y"}, "yes and no are the same answer"),
    ({"max_concurrency": 0}, "rewards[0].max_concurrency"),
])
def test_bad_options_are_one_line_naming_the_field(server, options, expected):
    with pytest.raises(RecipeError) as caught:
        entry(server, **options)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_key_variable_and_a_missing_httpx_are_one_line(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(RecipeError, match=r"^judge_http 'judge': api_key_env: the environment variable NO_SUCH_JUDGE_KEY "
                                          r"is not set"):
        build(server, api_key_env="NO_SUCH_JUDGE_KEY")
    monkeypatch.setitem(sys.modules, "httpx", None)  # as if it were not installed
    with pytest.raises(RecipeError, match=r"^judge_http 'judge': a remote judge needs httpx: pip install 'zenalign\[judge\]'$"):
        build(server)


# ---------------------------------------------------------------------------------------------- constitution

def test_constitution_takes_a_remote_judge(server, tmp_path):
    from zenalign_plugins.constitution import Constitution

    server.answer = lambda body: logprobs({" yes": 0.8, " no": 0.2} if "polite" in body["messages"][-1]["content"]
                                          else {" yes": 0.25, " no": 0.5})
    data = {"rewards": [{"type": "constitution", "name": "hhh", "remote": {"base_url": server.base_url, "model": "j"},
                         "principles": [{"name": "polite", "text": "be polite"}, {"name": "brief", "text": "be brief"}],
                         "template": "{completion} / {principle}"}]}
    options = validate_recipe(data, source="r.yaml", base_dir=tmp_path, name="r").recipe.rewards[0]
    judge = Constitution(options, BuildContext(recipe=Recipe(), base_dir=tmp_path, output_dir=tmp_path / "run"))
    scores = judge.score(batch("hi", "hello"))
    assert scores.flatten().tolist() == pytest.approx([0.8, 1 / 3, 0.8, 1 / 3])  # rows: completions; 0.25 / (0.25 + 0.5)
    assert sorted(b["messages"][-1]["content"] for b in server.bodies()) == [  # concurrent: in any order
        "hello / be brief", "hello / be polite", "hi / be brief", "hi / be polite"]
    assert judge.metrics()["requests"] == 4.0
    assert (tmp_path / "run" / "reward-cache" / "hhh.rank0.jsonl").is_file()
    data["rewards"][0]["judge"] = "models/hhh-judge"
    with pytest.raises(RecipeError, match="give exactly one judge: judge .* or remote"):
        validate_recipe(data, source="r.yaml", base_dir=tmp_path, name="r")


# ---------------------------------------------------------------------------------------------- a run

FIXTURE = REPO / "tests" / "fixtures" / "quickstart-10-steps.metrics.jsonl"
SEP = "<|judge|>"


def exact_judge(body):
    """The quickstart's verifier as a judge: 1 when the completion equals the answer (spaces ignored)."""
    completion, answer = body["messages"][-1]["content"].split(SEP)
    return reply("1" if completion.strip() == answer else "0")


def run_quickstart(server: JudgeServer, out: Path, *extra: str) -> subprocess.CompletedProcess:
    reward = (f"rewards=[{{type: judge_http, name: accuracy, base_url: '{server.base_url}', model: verifier, "
              f"template: '{{completion}}{SEP}{{answer}}', score_range: [0, 1]}}]")
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "zenalign", "run", str(RECIPES / "quickstart.yaml"), reward,
                           "run.steps=10", "run.checkpoint_interval=5", f"run.output_dir={out}", "-q", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_quickstart_trains_on_a_judge_and_a_resume_asks_nothing_again(tmp_path):
    """The quickstart with its verifier behind the judge server: every step's rewards, loss and KL
    equal the pinned quickstart's (the judge gives the same scores); resumed from step 5, the
    replayed steps are answered from reward-cache/ and score the same."""
    with JudgeServer(exact_judge) as server:
        done = run_quickstart(server, tmp_path / "run")
        assert done.returncode == 0, done.stderr
        asked = len(server.requests)
        lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        recorded = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
        for before, after in zip(recorded, lines, strict=True):
            for column in ("reward_mean", "reward_std", "zero_std_frac", "reward_mean/accuracy", "completion_len"):
                assert after[column] == before[column], (before["step"], column)
            assert math.isclose(after["loss"], before["loss"], rel_tol=1e-5, abs_tol=1e-9), before["step"]
            assert after["accuracy/errors"] == 0.0
            assert after["accuracy/requests"] + after["accuracy/cache_hits"] >= 64
        assert asked >= sum(line["accuracy/requests"] for line in lines)  # and the final evaluation's, after step 10
        done = run_quickstart(server, tmp_path / "run", "--resume", str(tmp_path / "run" / "checkpoints" / "step-00000005"))
        assert done.returncode == 0, done.stderr
        assert len(server.requests) == asked  # steps 6-10 and the final evaluation: all from the cache
    again = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["reward_mean"] for line in again] == [line["reward_mean"] for line in lines]
    assert [line["accuracy/cache_hits"] for line in again[5:]] == [64.0] * 5
