"""Issue 30, item 3: a reward cannot hang, exit or corrupt a run."""

import json
import math
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from helpers import RECIPES, REPO, run_cli
from zenalign.errors import RecipeError
from zenalign.grpo.scoring import Scorer, bind_reward, make_batch
from zenalign.plugins import DeadlineExceeded, call_with_deadline
from zenalign.recipe.loader import load_recipe
from zenalign.recipe.schema import RewardEntry

QUICKSTART = RECIPES / "quickstart.yaml"
SHORT = ["run.steps=3", "run.eval_interval=0", "data.eval_size=4", "run.progress_bar=false"]


def reward_recipe(tmp_path: Path, body: str, **entry) -> list[str]:
    """Overrides that make a python_function reward of ``body`` (a function ``fn``) the run's only reward."""
    (tmp_path / "myreward.py").write_text(textwrap.dedent(body))
    options = ", ".join(f"{k}: {v}" for k, v in {"type": "python_function", "name": "mine",
                                                  "function": f"'{tmp_path / 'myreward.py'}:fn'", **entry}.items())
    return [f"rewards=[{{{options}}}]", f"run.output_dir={tmp_path / 'run'}"]


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("zenalign: error:")]
    return line


def test_rewards_have_a_timeout_by_default():
    assert RewardEntry().timeout_s == 600.0
    assert load_recipe(QUICKSTART).recipe.rewards[0].timeout_s == 600.0


def test_a_reward_that_never_returns_ends_the_run_with_one_line_and_releases_the_lock(tmp_path):
    """It sleeps in the main thread (a blocking call): the deadline's signal interrupts it."""
    args = reward_recipe(tmp_path, "import time\n\ndef fn(completions):\n    time.sleep(3600)\n", timeout_s=1)
    started = time.time()
    message = one_error_line(run_cli("run", str(QUICKSTART), *SHORT, *args))
    assert time.time() - started < 60
    assert "rewards[0] 'mine' (python_function) took longer than its timeout_s (1 s) at step 0" in message  # the first evaluation
    assert not (tmp_path / "run" / "run.lock").exists()
    assert "DeadlineExceeded" in (tmp_path / "run" / "run.log").read_text()  # the traceback went to run.log


def test_the_deadline_interrupts_python_code_in_the_main_thread_and_keeps_it_there():
    seen = []

    def spin():
        seen.append(threading.current_thread() is threading.main_thread())
        while True:
            pass

    with pytest.raises(DeadlineExceeded):
        call_with_deadline(spin, 0.2)
    assert seen == [True]  # signal.alarm-based libraries (math-verify) keep working in a reward
    assert call_with_deadline(lambda: 5, 0.2) == 5
    time.sleep(0.3)  # a deadline whose call returned in time never fires later


def test_the_deadline_outside_the_main_thread_abandons_the_call():
    out = {}

    def worker():
        try:
            call_with_deadline(lambda: time.sleep(30), 0.2)
        except DeadlineExceeded:
            out["raised"] = True

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert out == {"raised": True}


def test_a_reward_that_swallows_the_interruption_ends_the_process_after_the_grace_period(tmp_path):
    """A bare `except` catches the deadline's exception and goes on: after the grace period
    (min(30 s, timeout_s)) the run releases its lock and exits 2 with one line."""
    body = """
        import time

        def fn(completions):
            while True:
                try:
                    time.sleep(10)
                except BaseException:
                    pass
    """
    args = reward_recipe(tmp_path, body, timeout_s=1)
    message = one_error_line(run_cli("run", str(QUICKSTART), *SHORT, *args, timeout=120))
    assert "took longer than its timeout_s (1 s) at step 0 and did not stop when interrupted" in message
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_call_holding_the_gil_in_c_code_is_ended_by_faulthandler(tmp_path):
    """A catastrophic regular expression runs in C holding the GIL, so no Python thread (the
    watchdog's neither) runs again: faulthandler's C thread prints the stacks and ends the process."""
    script = textwrap.dedent("""
        import re
        from zenalign.plugins import call_with_deadline

        call_with_deadline(lambda: re.match(r"(a+)+$", "a" * 64 + "b"), 0.3, grace_s=0.5)
    """)
    started = time.time()
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Timeout (0:00:01.80" in done.stderr and "<lambda>" in done.stderr
    assert time.time() - started < 30


@pytest.mark.parametrize("raised", ["SystemExit(0)", "KeyboardInterrupt()", "GeneratorExit()"])
def test_a_reward_that_raises_a_base_exception_is_one_line_not_a_clean_exit(tmp_path, raised):
    """`raise SystemExit(0)` inside a reward ended the run with exit 0 and no final/."""
    args = reward_recipe(tmp_path, f"def fn(completions):\n    raise {raised}\n")
    message = one_error_line(run_cli("run", str(QUICKSTART), *SHORT, *args))
    name = raised.split("(")[0]
    assert f"rewards[0] 'mine' (python_function) raised {name}" in message and "at step 0" in message
    assert not (tmp_path / "run" / "run.lock").exists() and not (tmp_path / "run" / "final").exists()


def test_a_reward_that_changes_its_arguments_changes_nothing_for_the_others():
    """Each source gets its own lists and its own copies of what is mutable inside them."""
    records = [{"prompt": [{"role": "user", "content": "say a"}], "answer": "a", "tags": ["x"]},
               {"prompt": [{"role": "user", "content": "say b"}], "answer": "b", "tags": ["y"]}]
    batch = make_batch(["say a", "say b"], records, ["a", "c", "b", "b"], [[97], [99], [98], [98]], 2, 1)
    seen = []

    def vandal(prompts, completions, answer, tags, completion_ids):
        prompts[0][0]["content"] = "changed"
        completions[0][0]["content"] = "changed"
        completions.clear()
        answer[:] = ["z"] * 4
        tags[0].append("added")
        with pytest.raises(TypeError):
            completion_ids[0][0] = 0  # token rows are tuples
        completion_ids.clear()
        return [0.0] * 4

    def witness(prompts, completions, answer, tags, completion_ids):
        seen.append((prompts[0][0]["content"], [c[0]["content"] for c in completions], list(answer), tags[0],
                     [list(ids) for ids in completion_ids]))
        return [float(c[0]["content"] == a) for c, a in zip(completions, answer)]

    scorer = Scorer([bind_reward(vandal, "vandal", "test"), bind_reward(witness, "witness", "test")])
    rewards = scorer(batch)
    assert rewards[:, 1].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert seen == [("say a", ["a", "c", "b", "b"], ["a", "a", "b", "b"], ["x"], [[97], [99], [98], [98]])]
    assert batch.completions == ["a", "c", "b", "b"] and batch.columns["tags"][0] == ["x"]
    assert batch.prompt_messages[0][0]["content"] == "say a"


@pytest.mark.parametrize("override, expected", [
    ("rewards.0.weight=nan", "rewards[0].weight"),
    ("rewards.0.weight=.inf", "rewards[0].weight"),
    ("rewards.0.timeout_s=.nan", "rewards[0].timeout_s"),
    ("objectives={accuracy: {weight: .nan}}", "objectives.accuracy.weight"),
])
def test_a_weight_that_is_not_a_finite_number_is_refused_at_validate(override, expected):
    with pytest.raises(RecipeError, match=re.escape(expected) + ".*finite number"):
        load_recipe(QUICKSTART, [override])


def test_a_nan_reward_weight_is_refused_by_the_api(tmp_path):
    from zenalign import GRPOTrainer

    def fn(completions):
        return [0.0] * len(completions)

    trainer = GRPOTrainer(model=str(RECIPES / "models" / "reverse-policy"), reward_funcs=[fn], reward_weights=[math.nan], train_dataset=[{"prompt": "reverse ab:"}],
                          output_dir=str(tmp_path / "run"), steps=1, progress_bar=False)
    with pytest.raises(RecipeError, match=r"reward_model\[0\] 'fn' is nan; give a finite number"):
        trainer.check()


def test_rewards_that_abstain_on_the_whole_batch_end_the_run_after_patience_steps(tmp_path):
    """Every score NaN from step 1, run.hacking_patience=3: steps 1 and 2 run and are logged (their
    advantages are 0), step 3 is the third silent step and ends the run before its update."""
    args = reward_recipe(tmp_path, "def fn(completions):\n    return [float('nan')] * len(completions)\n")
    done = run_cli("run", str(QUICKSTART), *SHORT, "run.steps=6", "run.hacking_patience=3", *args)
    message = one_error_line(done)
    assert "scored no completion (every score NaN or None) for objective 'mine' in 3 consecutive steps (steps 1-3)" in message
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["reward_mean"] is None and m["samples"] == 64 * m["step"] for m in lines)
