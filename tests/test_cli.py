"""The `zenalign` command in real subprocesses."""

import json

import pytest
from transformers import AutoModelForCausalLM

from conftest import RECIPES, run_cli


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    """The README's quickstart: held-out greedy accuracy starts below 50% and rises by 20+ points."""
    out = tmp_path / "quickstart"
    done = run_cli("run", str(RECIPES / "quickstart.yaml"), f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0]["eval/reward_mean/accuracy"], evals[-1]["eval/reward_mean/accuracy"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert before < 0.5
    assert after >= before + 0.20, (before, after)
    assert f"eval accuracy: {before:.3f} -> {after:.3f} (step 0 -> 60)" in done.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 60
    # training reward rises too: the last 10 steps beat the first 10 by a wide margin
    first = sum(m["reward_mean"] for m in metrics[:10]) / 10
    last = sum(m["reward_mean"] for m in metrics[-10:]) / 10
    assert last >= first + 0.15, (first, last)
    AutoModelForCausalLM.from_pretrained(out / "final")


@pytest.mark.slow
def test_recipe_with_a_plugin_file_runs(tmp_path):
    out = tmp_path / "custom"
    done = run_cli("run", str(RECIPES / "custom-reward.yaml"), "run.steps=3", "run.eval_interval=0",
                   "data.eval_size=8", f"run.output_dir={out}", "--quiet")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward_mean/accuracy", "reward_mean/partial"} <= set(metrics)
    assert "eval partial:" in done.stdout


def test_validate(tmp_path):
    done = run_cli("validate", str(RECIPES / "quickstart.yaml"), "grpo.kl_coef=0.02")
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout and "accuracy [exact_answer]" in done.stdout


def test_plugins_lists_types_and_options():
    done = run_cli("plugins")
    assert done.returncode == 0, done.stderr
    for text in ("reward source types:", "exact_answer", "normalizer types:", "group_zscore (default)", "rloo",
                 "task types:", "reverse", "pattern: str"):
        assert text in done.stdout


def test_plugins_with_a_recipe_shows_its_plugins():
    done = run_cli("plugins", str(RECIPES / "custom-reward.yaml"))
    assert done.returncode == 0 and "position_match" in done.stdout


def test_schema_is_json_schema():
    done = run_cli("schema")
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert set(schema["properties"]) == {"model", "data", "sampling", "grpo", "rewards", "normalizer", "engine", "run", "plugins"}
