"""The `zenalign` command in real subprocesses."""

import json
import re

import yaml

import pytest
from transformers import AutoModelForCausalLM

from helpers import RECIPES, REPO, run_cli


# The README states this tolerance: the same seed on another CPU (other BLAS kernels, other
# rounding) can flip a sampled token and follow another trajectory.
README_TOLERANCE = 0.10


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
    # the README's quickstart numbers are what a fresh clone prints, within README_TOLERANCE
    claimed = re.search(r"eval accuracy: ([0-9.]+) -> ([0-9.]+) \(step 0 -> 60\)", (REPO / "README.md").read_text())
    assert claimed, "the README's quickstart output is missing"
    assert before == pytest.approx(float(claimed[1]), abs=README_TOLERANCE)
    assert after == pytest.approx(float(claimed[2]), abs=README_TOLERANCE), (after, "the README claims", claimed[2])
    # stderr is a pipe here: log lines only, no progress bar fragments between them (issue 19)
    assert "\r" not in done.stderr and "GRPO:" not in done.stderr
    assert [line.split()[1] for line in done.stderr.splitlines() if line.startswith("step ")] == \
        ["10/60", "20/60", "30/60", "40/60", "50/60", "60/60"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 60
    # training reward rises too. Step means at temperature 1 scatter by about 0.13 (prompts differ
    # in difficulty), so thirds of the run are compared: the last 20 steps must beat the first 20
    # by 0.10, 2.4 standard errors of that difference (a run that does not learn passes with
    # probability under 1%). Observed: 0.23 here; 0.14-0.38 over the 8 seeds of bench/perf.py's
    # learning runs of this task. The last-10-versus-first-10 test it replaces (threshold 0.15,
    # standard error 0.06) failed on a run with other sampling draws at +0.13.
    first = sum(m["reward_mean"] for m in metrics[:20]) / 20
    last = sum(m["reward_mean"] for m in metrics[-20:]) / 20
    assert last >= first + 0.10, (first, last)
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
    assert set(schema["properties"]) == {"model", "data", "sampling", "grpo", "rewards", "objectives", "filters", "normalizer", "loss", "environment", "engine", "run", "plugins", "sweep"}


@pytest.mark.slow
def test_sweep_then_plot(tmp_path, tiny_model_dir):
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(f"""
model: {{path: {tiny_model_dir}}}
data: {{type: inline, prompts: ["reverse abc:", "reverse kite:"], eval_prompts: ["reverse dog:", "reverse moon:"]}}
sampling: {{group_size: 2, max_new_tokens: 4}}
grpo: {{prompts_per_step: 2, kl_coef: 0.0}}
rewards:
  - {{type: length, name: short}}
  - {{type: length, name: long, prefer: longer}}
run: {{steps: 2, progress_bar: false}}
sweep:
  grid: {{run.seed: [0, 1]}}
  weights:
    - {{short: 1.0, long: 0.0}}
    - {{short: 0.0, long: 1.0}}
  output_dir: {tmp_path / "sweep"}
""")
    done = run_cli("sweep", str(recipe), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs = sorted((tmp_path / "sweep").iterdir())
    assert [r.name for r in runs] == ["seed=0_w-short=0-long=1", "seed=0_w-short=1-long=0",
                                      "seed=1_w-short=0-long=1", "seed=1_w-short=1-long=0"]
    recipe_of = yaml.safe_load((runs[1] / "recipe.yaml").read_text())
    assert recipe_of["objectives"]["short"]["weight"] == 1.0 and recipe_of["objectives"]["long"]["weight"] == 0.0
    assert recipe_of["run"]["seed"] == 0
    # a second sweep skips the finished points
    again = run_cli("sweep", str(recipe), cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count("finished earlier; skipped") == 4
    plotted = run_cli("plot", *map(str, runs), "--out", str(tmp_path / "plots"), cwd=tmp_path)
    assert plotted.returncode == 0, plotted.stderr
    for name in ("reward_curves.png", "pareto_front.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "hypervolume:" in plotted.stdout and "Pareto front (short, long):" in plotted.stdout


def test_plot_rejects_a_directory_that_is_not_a_run(tmp_path):
    done = run_cli("plot", str(tmp_path), "--out", str(tmp_path / "plots"))
    assert done.returncode == 2 and "is not a run directory" in done.stderr and "Traceback" not in done.stderr
