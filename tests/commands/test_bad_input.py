"""The `zenalign` CLI on bad input: every mistake is one line on stderr, exit code 2, no traceback,
and the line names the file, field or plugin and says what would be accepted.

Each case writes a recipe (and any helper .py files) into tmp_path and runs the real command there
in a subprocess. Cases that fail during validation must print nothing but the error line; cases that
fail during training may print earlier log lines, but the error is the last line and appears once.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pytest
import yaml

from helpers import base_recipe, cli_in_process, error_line, run_cli, write_recipe


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge of ``patch`` into a copy of ``base``; lists and scalars replace."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def reward_file(body: str) -> str:
    """A myreward.py whose `fn(completions, step)` runs `body` (which must return the scores)."""
    return "import math\n\ndef fn(completions, step):\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n"


PYFN_REWARD = {"rewards": [{"type": "python_function", "function": "myreward.py:fn"}]}


@dataclass
class Case:
    id: str
    # A patch merged into base_recipe, raw YAML text (or bytes) written as is, or None (no recipe file).
    recipe: Union[dict[str, Any], str, bytes, None]
    expect: list[str]  # substrings the error line must contain: the place, and what is accepted
    files: dict[str, Union[str, bytes]] = field(default_factory=dict)  # extra files written next to the recipe
    command: str = "run"
    overrides: list[str] = field(default_factory=list)
    # True: the error happens after the run started (earlier log lines may precede it).
    during_run: bool = False
    expect_regex: list[str] = field(default_factory=list)
    recipe_name: str = "recipe.yaml"  # the file passed to the CLI (need not exist)
    replace: dict[str, Any] = field(default_factory=dict)  # top-level sections replaced whole


CASES = [
    # --- the recipe file itself -------------------------------------------------------------
    Case(
        "missing-recipe-file",
        None,
        ["does-not-exist.yaml", "does not exist"],
        recipe_name="does-not-exist.yaml",
    ),
    Case(
        "malformed-yaml-unclosed-bracket",
        "model:\n  path: m\nsampling:\n  group_size: [2, 4\ngrpo:\n  kl_coef: 0.1\n",
        ["recipe.yaml:", "invalid YAML"],
        command="validate",
        # the parser notices the unclosed flow sequence at the colon after `grpo` (line 5, column 5)
        expect_regex=[r"recipe\.yaml:5:5: invalid YAML: expected ',' or ']'"],
    ),
    Case(
        "malformed-yaml-bad-indentation",
        "model:\n  path: m\n   tokenizer_path: t\n",
        ["recipe.yaml:", "invalid YAML"],
        command="validate",
        expect_regex=[r"recipe\.yaml:3:\d+: invalid YAML"],
    ),
    Case(
        "recipe-not-a-mapping",
        "- model\n- data\n",
        ["recipe.yaml", "must be a mapping", "model, data, sampling"],
        command="validate",
    ),
    # --- unknown keys -----------------------------------------------------------------------
    Case(
        "unknown-top-level-key",
        {"modle": {"path": "x"}},
        ["recipe.yaml", "modle", "unknown field", "accepted here:", "model", "sampling", "grpo", "rewards"],
        command="validate",
    ),
    Case(
        "unknown-key-in-section",
        {"grpo": {"kl_coeff": 0.2}},
        ["recipe.yaml", "grpo.kl_coeff", "unknown field", "accepted here:", "kl_coef,", "learning_rate"],
        command="validate",
    ),
    Case(
        "unknown-loss-option",
        {"loss": {"type": "grpo", "clip_epsilonn": 0.2}},
        ["recipe.yaml", "loss.clip_epsilonn", "unknown field", "accepted here:", "clip_epsilon,", "aggregation"],
        command="validate",
    ),
    Case(
        "loss-option-and-its-older-name-differ",
        {"grpo": {"clip_epsilon": 0.1}, "loss": {"clip_epsilon": 0.3}},
        ["recipe.yaml: loss.clip_epsilon and grpo.clip_epsilon (now loss.clip_epsilon) both set loss.clip_epsilon "
         "(0.3 vs 0.1); give it once"],
        command="validate",
    ),
    # --- wrong types and bounds -------------------------------------------------------------
    Case(
        "kl-coef-not-a-number",
        {"grpo": {"kl_coef": "abc"}},
        ["recipe.yaml", "grpo.kl_coef", "expected a number", "'abc'"],
        command="validate",
    ),
    Case(
        "group-size-not-an-integer",
        {"sampling": {"group_size": 2.5}},
        ["recipe.yaml", "sampling.group_size", "expected a whole number", "2.5"],
        command="validate",
    ),
    Case(
        "group-size-1",
        {"sampling": {"group_size": 1}},
        ["recipe.yaml", "sampling.group_size", "must be >= 2", "got 1"],
    ),
    Case(
        "negative-kl-coef",
        {"grpo": {"kl_coef": -0.5}},
        ["recipe.yaml", "grpo.kl_coef", "must be >= 0", "-0.5"],
    ),
    Case(
        "bad-literal-kl-estimator",
        {"loss": {"kl_estimator": "k4"}},
        ["recipe.yaml", "loss.kl_estimator", "must be one of", "k1", "k3", "'k4'"],
        command="validate",
    ),
    Case(
        "bad-literal-kl-estimator-older-name",
        {"grpo": {"kl_estimator": "k4"}},
        ["recipe.yaml", "loss.kl_estimator", "must be one of", "k1", "k3", "'k4'"],
        command="validate",
    ),
    # --- plugin types and options -----------------------------------------------------------
    Case(
        "unknown-reward-type",
        {"rewards": [{"type": "no_such_reward"}]},
        ["recipe.yaml", "rewards[0]", "unknown type 'no_such_reward'", "installed types:",
         "exact_answer", "regex_match", "python_function", "length"],
        command="validate",
    ),
    Case(
        "unknown-normalizer-type",
        {"normalizer": {"type": "zscore_typo"}},
        ["recipe.yaml", "normalizer", "unknown type 'zscore_typo'", "installed types:", "group_zscore", "rloo", "rank"],
        command="validate",
    ),
    Case(
        "reward-missing-type",
        {"rewards": [{"name": "acc"}]},
        ["recipe.yaml", "rewards[0]", "missing 'type'", "zenalign plugins"],
        command="validate",
    ),
    Case(
        "unknown-plugin-option",
        {"rewards": [{"type": "regex_match", "patern": "abc"}]},
        ["recipe.yaml", "rewards[0].patern", "unknown field", "accepted here:", "pattern", "mode", "match_score"],
        command="validate",
    ),
    Case(
        "invalid-regex-option",
        {"rewards": [{"type": "regex_match", "pattern": "(unclosed"}]},
        ["recipe.yaml", "rewards[0].pattern", "not a valid regular expression"],
        command="validate",
    ),
    # --- plugins: ---------------------------------------------------------------------------
    Case(
        "plugin-path-does-not-exist",
        {"plugins": ["my_plugins/nope.py"]},
        ["plugins[0]", "nope.py", "does not exist", "looked for"],
        command="validate",
    ),
    Case(
        "plugin-raises-at-import",
        {"plugins": ["broken.py"]},
        ["plugins[0]", "broken.py", "failed to import", "RuntimeError", "plugin exploded"],
        files={"broken.py": "raise RuntimeError('plugin exploded')\n"},
        command="validate",
    ),
    Case(
        "plugin-syntax-error",
        {"plugins": ["broken.py"]},
        ["plugins[0]", "broken.py", "failed to import", "SyntaxError"],
        files={"broken.py": "def oops(:\n    pass\n"},
        command="validate",
    ),
    Case(
        "plugin-hook-name-misspelled",
        {"plugins": ["events.py"]},
        ["plugins[0]", "events.py", "@hookimpl 'zenalign_on_step_ends' matches no zenalign hook",
         "did you mean 'zenalign_on_step_end'"],
        files={"events.py": "from zenalign import hookimpl\n\n@hookimpl\n"
                            "def zenalign_on_step_ends(context, step, metrics):\n    pass\n"},
        command="validate",
    ),
    Case(
        "plugin-module-not-installed",
        {"plugins": ["no_such_zenalign_plugin_module"]},
        ["plugins[0]", "no module named 'no_such_zenalign_plugin_module'", "importable module name", ".py file"],
        command="validate",
    ),
    # --- rewards that misbehave during training ---------------------------------------------
    Case(
        "reward-raises",
        PYFN_REWARD,
        ["rewards[0] 'fn' (python_function)", "raised ValueError", "reward exploded",
         "myreward.py:4 (in fn)", "at step 1", "run.log has the traceback"],
        files={"myreward.py": reward_file("raise ValueError('reward exploded')")},
        during_run=True,
    ),
    Case(
        "reward-wrong-number-of-scores",
        PYFN_REWARD,
        ["rewards[0] 'fn' (python_function)", "returned 1 scores for 4 completions", "one score per completion"],
        files={"myreward.py": reward_file("return [1.0]")},
        during_run=True,
    ),
    Case(
        "reward-returns-string",
        PYFN_REWARD,
        ["rewards[0] 'fn' (python_function)", "returned str 'good'", "scores must be numbers", "NaN or None to abstain"],
        files={"myreward.py": reward_file("return ['good' for _ in completions]")},
        during_run=True,
    ),
    Case(  # issue 15, finding 8: a reward that hangs hung the run forever
        "reward-hangs-past-its-timeout",
        {"rewards": [{"type": "python_function", "function": "myreward.py:fn", "timeout_s": 0.5}]},
        ["rewards[0] 'fn' (python_function)", "took longer than its timeout_s (0.5 s)", "at step 1",
         "raise timeout_s"],
        files={"myreward.py": "import time\n\ndef fn(completions, step):\n    time.sleep(3600)\n"},
        during_run=True,
    ),
    Case(  # issue 15, finding 8: a reward returning None for everything ran to the end
        "reward-never-scores",
        merge(PYFN_REWARD, {"run": {"hacking_patience": 1}}),
        ["rewards[0] 'fn' (python_function)", "scored no completion", "objective 'fn'",
         "1 consecutive steps", "run.hacking_patience"],
        files={"myreward.py": reward_file("return [None for _ in completions]")},
        during_run=True,
    ),
    Case(
        "reward-returns-infinity",
        PYFN_REWARD,
        ["rewards[0] 'fn' (python_function)", "returned inf", "scores must be finite", "NaN or None to abstain"],
        files={"myreward.py": reward_file("return [math.inf for _ in completions]")},
        during_run=True,
    ),
    Case(
        "reward-function-missing-attribute",
        {"rewards": [{"type": "python_function", "function": "myreward.py:nope"}]},
        ["recipe.yaml", "rewards[0] (python_function)", "myreward.py", "has no attribute 'nope'"],
        files={"myreward.py": reward_file("return [0.0 for _ in completions]")},
        command="validate",
    ),
    # --- model and data ---------------------------------------------------------------------
    Case(
        "model-path-does-not-exist",
        {"model": {"path": "no-such-model-dir"}},
        ["model.path", "no-such-model-dir", "does not exist", "local Hugging Face model directory"],
        during_run=True,
    ),
    Case(
        "validate-model-path-does-not-exist",
        {"model": {"path": "no-such-model-dir"}},
        ["model.path", "no-such-model-dir", "does not exist", "local Hugging Face model directory"],
        command="validate",
    ),
    Case(
        "empty-prompt-set",
        {"data": {"type": "inline", "prompts": [], "eval_prompts": []}},
        ["recipe.yaml", "data.prompts", "needs at least 1 entry (got 0)"],
    ),
    Case(
        "empty-prompt-file",
        {},
        ["recipe.yaml", "data", "prompt set is empty", "at least one training prompt"],
        files={"prompts.jsonl": "\n"},
        command="validate",
        replace={"data": {"type": "jsonl", "path": "prompts.jsonl"}},
    ),
    Case(
        "prompt-file-bad-json-line",
        {},
        ["prompts.jsonl:2", "not valid JSON"],
        files={"prompts.jsonl": '{"prompt": "a"}\n{"prompt": oops}\n'},
        command="validate",
        replace={"data": {"type": "jsonl", "path": "prompts.jsonl"}},
    ),
    Case(
        # `validate` promises to check the recipe; a prompt set that `run` rejects should not be "valid".
        "validate-empty-prompt-set",
        {"data": {"type": "inline", "prompts": [], "eval_prompts": []}},
        ["recipe.yaml", "data.prompts", "needs at least 1 entry (got 0)"],
        command="validate",
    ),
    # --- engine ----------------------------------------------------------------------------
    Case(
        "zero3-with-torch-backend",
        {"engine": {"zero_stage": 3}},
        ["recipe.yaml", "engine.zero_stage", "needs engine.backend: deepspeed", "got 3"],
        command="validate",
    ),
    Case(
        "optimizer-offload-with-zero0",
        {"engine": {"backend": "deepspeed", "offload_optimizer": True}},
        ["recipe.yaml", "engine.offload_optimizer", "needs engine.zero_stage 1, 2 or 3"],
    ),
    Case(
        "param-offload-without-zero3",
        {"engine": {"backend": "deepspeed", "zero_stage": 2, "offload_params": True}},
        ["recipe.yaml", "engine.offload_params", "needs engine.zero_stage 3"],
        command="validate",
    ),
    Case(
        "unknown-backend",
        {"engine": {"backend": "megatron"}},
        ["recipe.yaml", "engine.backend", "must be one of 'torch' or 'deepspeed'", "'megatron'"],
        command="validate",
    ),
    # --- objectives --------------------------------------------------------------------------
    Case(
        "objective-no-source-produces",
        {"objectives": {"lenght": {"weight": 2.0}}},
        ["recipe.yaml", "objectives.lenght", "no reward source produces objective 'lenght'", "produced: length"],
        command="validate",
    ),
    Case(
        "constraint-without-threshold",
        {"objectives": {"length": {"role": "constraint"}}},
        ["recipe.yaml", "objectives.length.threshold", "a constraint needs a threshold"],
        command="validate",
    ),
    Case(
        "weights-all-zero",
        {"rewards": [{"type": "length", "weight": 0.0}, {"type": "regex_match", "pattern": "a", "weight": 0.0}]},
        ["recipe.yaml", "objectives", "every reward objective has weight 0", "length, regex_match", "non-zero weight"],
        command="validate",
    ),
    Case(
        "sweep-unknown-objective-in-weights",
        {"sweep": {"weights": [{"length": 1.0}, {"lenght": 2.0}]}},
        ["recipe.yaml", "sweep.weights[1].lenght", "unknown objective", "produced: length"],
        command="sweep",
    ),
    Case(
        "sweep-weights-all-zero",
        {"sweep": {"weights": [{"length": 0.0}]}},
        ["recipe.yaml", "sweep.weights[0]", "every weight is 0"],
        command="sweep",
    ),
    Case(
        "sweep-missing",
        {},
        ["recipe.yaml", "sweep", "no sweep section"],
        command="sweep",
    ),
    # --- reward models and judges -----------------------------------------------------------
    Case(
        "rm-directory-missing",
        {"rewards": [{"type": "learned_rm", "path": "no-such-rm"}]},
        ["recipe.yaml", "rewards[0] (learned_rm)", "no-such-rm", "does not exist", "Hugging Face model directory"],
        command="validate",
    ),
    Case(
        "rm-not-a-sequence-classifier",
        {"rewards": [{"type": "learned_rm", "path": "@MODEL@"}]},
        ["rewards[0] (learned_rm)", "is not a sequence classifier (architectures: LlamaForCausalLM)", "train-rm"],
        command="validate",
    ),
    Case(
        "judge-yes-not-one-token",
        {"rewards": [{"type": "constitution", "judge": "@MODEL@", "yes": "yes", "no": "n", "principles": ["be kind"]}]},
        ["rewards[0] (constitution)", "constitution.yes: 'yes' is 3 tokens", "must be exactly one"],
        command="validate",
    ),
    Case(
        "constitution-empty-principles",
        {"rewards": [{"type": "constitution", "judge": "@MODEL@", "yes": "y", "no": "n", "principles": []}]},
        ["rewards[0] (constitution)", "constitution.principles: the list is empty", "at least one principle"],
        command="validate",
    ),
    # --- command-line overrides -------------------------------------------------------------
    Case(
        "override-out-of-range",
        {},
        ["override 'grpo.kl_coef=-1'", "grpo.kl_coef", "must be >= 0", "got -1"],
        overrides=["grpo.kl_coef=-1"],
    ),
    Case(
        "override-without-equals",
        {},
        ["override 'grpo.kl_coef'", "expected KEY.PATH=VALUE", "grpo.kl_coef=0.02"],
        overrides=["grpo.kl_coef"],
    ),
    Case(
        "override-unknown-field",
        {},
        ["override 'grpo.kl_coeff=0.1'", "grpo.kl_coeff", "unknown field", "accepted here:", "kl_coef"],
        overrides=["grpo.kl_coeff=0.1"],
        command="validate",
    ),
    Case(
        "override-index-out-of-range",
        {},
        ["override 'rewards.3.weight=2'", "out of range", "1 entries"],
        overrides=["rewards.3.weight=2"],
        command="validate",
    ),
    # --- bounds (issue 30.5) ------------------------------------------------------------------
    # 2 prompts x 10^9 completions of 12 + 4 tokens: the KV cache (2 layers x 2 x 1 head x 16 values
    # x 4 bytes = 256 bytes a token) 2e9 x 16 x 256 = 8.19e12 bytes, one step's logits 2e9 x 384 x 4
    # = 3.07e12: 1.126e13 bytes = 10.2 TiB. Was an out-of-memory traceback at step 1.
    Case(
        "group-size-beyond-memory-at-validate",
        {},
        ["recipe.yaml: the sampling batch holds 2,000,000,000 rows of up to 16 tokens per process: at least 10.2 TiB",
         "of this machine's memory available", "lower sampling.group_size, grpo.prompts_per_step or sampling.max_new_tokens"],
        overrides=["sampling.group_size=1000000000"],
        command="validate",
    ),
    Case(
        "group-size-beyond-memory-at-run",
        {},
        ["the sampling batch holds 2,000,000,000 rows", "lower sampling.group_size"],
        overrides=["sampling.group_size=1000000000"],
        during_run=True,
    ),
    Case(
        "prompts-per-step-beyond-memory",
        {"grpo": {"prompts_per_step": 10**12}},
        ["the sampling batch holds 2,000,000,000,000 rows", "lower sampling.group_size, grpo.prompts_per_step"],
        command="validate",
    ),
    Case(
        "eval-group-size-beyond-memory",
        {"data": {"eval_prompts": ["reverse dog:"]}, "run": {"eval_group_size": 10**10}},
        ["an evaluation batch holds 10,000,000,000 rows", "lower run.eval_batch_size or run.eval_group_size"],
        command="validate",
    ),
    Case(
        "temperature-infinite",
        {"sampling": {"temperature": float("inf")}},
        ["recipe.yaml: sampling.temperature: expected a finite number (got inf)"],
        command="validate",
    ),
    Case(
        "kl-coef-infinite",
        {"grpo": {"kl_coef": float("inf")}},
        ["recipe.yaml: grpo.kl_coef: expected a finite number (got inf)"],
        command="validate",
    ),
    Case(
        "learning-rate-infinite",
        {"grpo": {"learning_rate": float("inf")}},
        ["recipe.yaml: grpo.learning_rate: expected a finite number (got inf)"],
        command="validate",
    ),
    Case(
        "true-for-a-number",
        {"run": {"eval_interval": True}},
        ["recipe.yaml: run.eval_interval: expected a number (got True)"],
        command="validate",
    ),
    Case(
        "prompt-file-all-empty",
        {},
        ["recipe.yaml: data (jsonl, prompts.jsonl): all 3 prompts are empty or whitespace only; give prompts with text"],
        files={"prompts.jsonl": '{"prompt": ""}\n{"prompt": "  "}\n{"prompt": "\\n\\t"}\n'},
        command="validate",
        replace={"data": {"type": "jsonl", "path": "prompts.jsonl"}},
    ),
    Case(
        # was `RuntimeError: cannot reshape tensor of 0 elements` at step 1
        "inline-prompts-all-empty-at-run",
        {"data": {"prompts": ["", ""]}},
        ["data (inline): all 2 prompts are empty or whitespace only"],
        during_run=True,
    ),
    Case(
        "prompt-file-not-utf8",
        {},
        ["prompts.jsonl:2: not valid UTF-8 (byte 0xe9 at byte 16 of the line); save the file as UTF-8"],
        files={"prompts.jsonl": b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'},  # Latin-1
        command="validate",
        replace={"data": {"type": "jsonl", "path": "prompts.jsonl"}},
    ),
    Case(
        "recipe-not-utf8",
        b"model:\n  path: m\nrun:\n  output_dir: caf\xe9\n",
        ["recipe.yaml:4: not valid UTF-8 (byte 0xe9 at byte 18 of the line)"],
        command="validate",
    ),
]


def write_case(case: Case, tmp_path: Path, model_dir: Path) -> Path:
    for name, text in case.files.items():
        if isinstance(text, bytes):
            (tmp_path / name).write_bytes(text)
        else:
            (tmp_path / name).write_text(text, encoding="utf-8")
    recipe_path = tmp_path / case.recipe_name
    if isinstance(case.recipe, bytes):
        recipe_path.write_bytes(case.recipe)
    elif isinstance(case.recipe, str):
        recipe_path.write_text(case.recipe, encoding="utf-8")
    elif isinstance(case.recipe, dict):
        data = {**merge(base_recipe(model_dir, tmp_path / "run"), case.recipe), **case.replace}
        text = yaml.safe_dump(data, sort_keys=False).replace("'@MODEL@'", str(model_dir)).replace("@MODEL@", str(model_dir))
        recipe_path.write_text(text, encoding="utf-8")
    return recipe_path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Cases refused before a run starts call the CLI's main() in this process (the same exit code
    and output, without a new Python); those refused during a run, and sweeps, are real processes."""
    recipe_path = write_case(case, tmp_path, tiny_model_dir)
    runner = run_cli if case.during_run or case.command == "sweep" else cli_in_process
    proc = runner(case.command, str(recipe_path), *case.overrides, cwd=tmp_path)
    message = error_line(proc, case.during_run)
    for text in case.expect:
        assert text in message, f"{text!r} not in the error line:\n{message}"
    for pattern in case.expect_regex:
        assert re.search(pattern, message), f"/{pattern}/ does not match the error line:\n{message}"
    # a validation error never gets as far as creating the run directory
    if not case.during_run:
        assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# What a failed run leaves behind


def test_run_failing_midway_keeps_metrics(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A reward that raises at step 2: metrics.jsonl keeps the step-1 line, nothing else; no final/."""
    (tmp_path / "myreward.py").write_text(
        reward_file(
            """
            if step >= 2:
                raise RuntimeError('second step went wrong')
            return [float(len(c)) for c in completions]
            """
        ),
        encoding="utf-8",
    )
    out = tmp_path / "run"
    data = merge(base_recipe(tiny_model_dir, out), {**PYFN_REWARD, "run": {"steps": 2}})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    proc = run_cli("run", str(recipe_path), cwd=tmp_path)
    message = error_line(proc, during_run=True)
    assert "rewards[0] 'fn' (python_function)" in message
    assert "raised RuntimeError: second step went wrong at " in message
    assert f"{tmp_path / 'myreward.py'}:5 (in fn) (at step 2)" in message  # the user's file and line
    logged = (out / "run.log").read_text(encoding="utf-8")  # the whole traceback, for the user to read
    assert "Traceback (most recent call last)" in logged and "raise RuntimeError('second step went wrong')" in logged
    debug = run_cli("run", str(recipe_path), "run.overwrite=true", "--debug", cwd=tmp_path)  # re-raised with it
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "myreward.py\", line 5" in debug.stderr

    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n"), "the last metrics line is incomplete"
    lines = text.splitlines()
    assert len(lines) == 1, text
    record = json.loads(lines[0])
    assert record["step"] == 1
    assert not (out / "final").exists()
    assert not (out / "final.tmp").exists()


def test_existing_run_dir_is_not_overwritten(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A run directory that already holds a run is refused (exit 2) and left byte-for-byte as it was."""
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    existing = {
        "zenalign-run.json": b'{"run_id": "0123456789abcdef0123456789abcdef"}\n',  # what marks it a run
        "recipe.yaml": b"model: {path: earlier}\n",
        "metrics.jsonl": b'{"step": 1, "reward_mean": 0.5}\n{"step": 2, "reward_mean": 0.75}\n',
        "run.log": b"an earlier run\n",
        "notes.txt": b"my own notes\n",
        "final/model.safetensors": bytes(range(256)),
    }
    for name, content in existing.items():
        (out / name).write_bytes(content)
    before = {p.relative_to(out).as_posix() for p in out.rglob("*")}

    data = base_recipe(tiny_model_dir, out)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    proc = run_cli("run", str(recipe_path), cwd=tmp_path)
    message = error_line(proc, during_run=True)
    assert "run.output_dir" in message and str(out) in message
    assert "already holds a run" in message
    assert "run.overwrite=true" in message

    assert {p.relative_to(out).as_posix() for p in out.rglob("*")} == before
    for name, content in existing.items():
        assert (out / name).read_bytes() == content, f"{name} changed"


# --- the tokenizer, checked by validate (issue 19) ----------------------------------------------


def model_variant(tiny_model_dir: Path, tmp_path: Path, keep_tokenizer: bool = True, **config: Any) -> Path:
    """A copy of the tiny model directory, without its tokenizer files or with config.json changed."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    if not keep_tokenizer:
        for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"):
            (out / name).unlink(missing_ok=True)
    settings = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**settings, **config}))
    return out


def test_a_model_saved_without_its_tokenizer_is_one_line_at_validate_and_run(tmp_path, tiny_model_dir):
    """transformers 5 hands back an empty default tokenizer there, which died 30 frames deep in
    `cannot reshape tensor of 0 elements`, while validate said "valid"."""
    model = model_variant(tiny_model_dir, tmp_path, keep_tokenizer=False)
    recipe = write_recipe(tmp_path, base_recipe(model, tmp_path / "run"))
    for command in ("validate", "run"):
        message = error_line(run_cli(command, str(recipe)), during_run=command == "run")
        assert f"model.path: '{model}' holds no tokenizer files" in message and "model.tokenizer_path" in message


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path, tiny_model_dir):
    model = model_variant(tiny_model_dir, tmp_path, vocab_size=300)  # the byte tokenizer has 384 ids
    message = error_line(run_cli("validate", str(write_recipe(tmp_path, base_recipe(model, tmp_path / "run")))), False)
    assert "the tokenizer has 384 tokens but the model" in message and "embeds only 300" in message


def test_validate_checks_prompt_length_against_the_models_positions(tmp_path, tiny_model_dir):
    positions = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    data = merge(base_recipe(tiny_model_dir, tmp_path / "run"), {"sampling": {"max_new_tokens": positions - 5}})
    message = error_line(run_cli("validate", str(write_recipe(tmp_path, data))), during_run=False)
    # "reverse abc:" is 12 byte tokens
    assert f"the longest prompt (prompts[0]) is 12 tokens, and 12 + {positions - 5} = {positions + 7} exceeds the " \
           f"model's {positions} positions" in message


@pytest.mark.parametrize("field", ["messages", "prompt"])
def test_validate_checks_the_chat_template_for_messages(tmp_path, tiny_model_dir, field):
    """The error names the field that holds the messages: zenalign's `messages`, or TRL's
    conversational `prompt` (issue 35: it said 'messages' for both)."""
    data = merge(base_recipe(tiny_model_dir, tmp_path / "run"),
                 {"data": {"prompts": ["reverse abc:", {field: [{"role": "user", "content": "hi"}]}]}})
    message = error_line(run_cli("validate", str(write_recipe(tmp_path, data))), during_run=False)
    assert message.endswith(f"prompts[1]: '{field}' is a list of chat messages but the tokenizer of "
                            f"'{tiny_model_dir}' has no chat template; give a tokenizer with one (model.tokenizer_path) "
                            f"or 'prompt' as text")


def test_records_missing_a_field_a_reward_reads_are_counted_and_logged(tmp_path, tiny_model_dir):
    """Issue 19: records lacking `answer` were scored None and left out of the statistics without a
    word. Now a warning at start counts them, and abstain_frac/<objective> is logged every step."""
    data = merge(base_recipe(tiny_model_dir, tmp_path / "run"),
                 {"data": {"prompts": [{"prompt": "reverse abc:", "answer": "cba"}, {"prompt": "reverse dog:"}]},
                  "rewards": [{"type": "exact_answer", "name": "accuracy"}], "run": {"steps": 2}})
    done = run_cli("run", str(write_recipe(tmp_path, data)))
    assert done.returncode == 0, done.stderr
    assert ("rewards[0] 'accuracy' (exact_answer) reads the field 'answer', which 1 of 2 training prompts lack "
            "(or hold null): it abstains on their completions (abstain_frac/accuracy in metrics.jsonl)") in done.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["abstain_frac/accuracy"] for m in metrics] == [0.5, 0.5]  # one prompt of two, both completions
    done = run_cli("validate", str(write_recipe(tmp_path, data)))  # validate says it too
    assert "which 1 of 2 training prompts lack" in done.stderr


def test_a_python_reward_asking_for_a_field_is_checked_against_the_records(tmp_path, tiny_model_dir):
    (tmp_path / "myreward.py").write_text("def fn(completions, answer, **kwargs):\n"
                                          "    return [None if a is None else float(c == a) for c, a in zip(completions, answer)]\n")
    data = merge(base_recipe(tiny_model_dir, tmp_path / "run"),
                 {"data": {"prompts": [{"prompt": "reverse abc:", "answer": "cba"}, {"prompt": "reverse dog:"},
                                       {"prompt": "reverse sun:", "answer": None}]}, **PYFN_REWARD})
    done = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert done.returncode == 0, done.stderr
    assert "reads the field 'answer', which 2 of 3 training prompts lack" in done.stderr


def test_a_tokenizer_with_an_empty_vocabulary_is_one_line(tmp_path, tiny_model_dir):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab={}, unk_token=None))).save_pretrained(
        tmp_path / "tokenizer")
    data = merge(base_recipe(tiny_model_dir, tmp_path / "run"), {"model": {"tokenizer_path": str(tmp_path / "tokenizer")}})
    message = error_line(run_cli("validate", str(write_recipe(tmp_path, data))), during_run=False)
    assert f"model.tokenizer_path: the tokenizer in '{tmp_path / 'tokenizer'}' has an empty vocabulary" in message


def test_the_logged_lr_is_the_rate_the_step_used(tmp_path, tiny_model_dir):
    """Issue 19: `lr` was read after scheduler.step(), so each line showed the next step's rate."""
    data = merge(base_recipe(tiny_model_dir, tmp_path / "run"),
                 {"grpo": {"learning_rate": 1.0e-3, "warmup_steps": 4}, "run": {"steps": 3}})
    done = run_cli("run", str(write_recipe(tmp_path, data)))
    assert done.returncode == 0, done.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])  # warm-up: (s + 1) / 4 of the peak


# --------------------------------------------------------------------------------------------
# Bounds at validate (issue 30.5)


def test_some_empty_prompts_are_counted_and_left_out(tmp_path, tiny_model_dir):
    """An empty prompt among others was sampled: it has no token for the first completion token to
    attend to, so the lean forward's first-prompt check disagreed with transformers ("differ by
    1.42e+01") and the run fell back to transformers' forward. Now such prompts are counted, warned
    about and left out, at validate and at run."""
    data = merge(base_recipe(tiny_model_dir, tmp_path / "run"), {"data": {"prompts": ["", "reverse abc:", " \n "]},
                                                                 "run": {"log_interval": 1}})
    warning = "recipe.yaml: data (inline): 2 of 3 prompts are empty or whitespace only; they are left out"
    checked = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert checked.returncode == 0 and warning in checked.stderr, checked.stderr
    done = run_cli("run", str(write_recipe(tmp_path, data)))
    assert done.returncode == 0 and warning in done.stderr, done.stderr
    assert "disagrees" not in done.stderr
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples if not s.get("eval")} == {"reverse abc:"}


def test_a_prompt_file_starting_with_a_byte_order_mark_is_read(tmp_path, tiny_model_dir):
    (tmp_path / "prompts.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "reverse abc:"}\n{"prompt": "reverse dog:"}\n')
    data = {**base_recipe(tiny_model_dir, tmp_path / "run"), "data": {"type": "jsonl", "path": "prompts.jsonl"}}
    done = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert done.returncode == 0, done.stderr


def test_a_kl_coef_above_10_is_warned_about_at_validate(tmp_path, tiny_model_dir):
    data = merge(base_recipe(tiny_model_dir, tmp_path / "run"), {"grpo": {"kl_coef": 20}})
    done = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert done.returncode == 0, done.stderr
    assert "grpo.kl_coef is 20: above 10 the KL penalty outweighs the policy-gradient term" in done.stderr


def test_export_to_an_existing_file_is_one_line(tmp_path, tiny_model_dir):
    """Was a NotADirectoryError traceback, after the checkpoint had been read."""
    done = run_cli("run", str(write_recipe(tmp_path, base_recipe(tiny_model_dir, tmp_path / "run"))))
    assert done.returncode == 0, done.stderr
    (tmp_path / "notes.txt").write_text("not a directory\n")
    message = error_line(run_cli("export", str(tmp_path / "run"), str(tmp_path / "notes.txt")), during_run=False)
    assert f"export: '{tmp_path / 'notes.txt'}' is an existing file; give a new directory" in message
    assert (tmp_path / "notes.txt").read_text() == "not a directory\n"


@pytest.mark.parametrize("signature", ["completions, answer, **kwargs", "completions, answer"])
def test_a_reward_function_needing_a_missing_field_abstains_as_validate_says(tmp_path, tiny_model_dir, signature):
    """Issue 35: validate warned that a reward reading a missing column 'abstains on their
    completions', and the run then stopped with `TypeError: missing 1 required positional argument`
    (or, without **kwargs, an error that the batch lacks it). The completions of records without the
    field are kept from the function and abstain; the function sees only the others."""
    # the score is the number of completions the function was given: 2 (one group) if the record
    # without an answer is kept from it, 4 if it is passed along with answer None
    (tmp_path / "myreward.py").write_text(f"def fn({signature}):\n    return [float(len(answer))] * len(answer)\n")
    data = merge(base_recipe(tiny_model_dir, tmp_path / "run"),
                 {"data": {"prompts": [{"prompt": "reverse abc:", "answer": "cba"}, {"prompt": "reverse dog:"}]},
                  **PYFN_REWARD, "run": {"steps": 2}})
    warning = ("rewards[0] 'fn' (python_function) reads the field 'answer', which 1 of 2 training prompts lack (or hold "
               "null): it abstains on their completions (abstain_frac/fn in metrics.jsonl)")
    checked = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert checked.returncode == 0 and warning in checked.stderr, checked.stderr
    done = run_cli("run", str(write_recipe(tmp_path, data)))
    assert done.returncode == 0 and warning in done.stderr, done.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["reward_mean"], m["abstain_frac/fn"]) for m in metrics] == [(2.0, 0.5), (2.0, 0.5)]

    data = merge(data, {"data": {"prompts": ["reverse abc:", "reverse dog:"]}, "run": {"overwrite": True}})
    warning = ("rewards[0] 'fn' (python_function) reads the field 'answer', which 2 of 2 training prompts lack (or hold "
               "null): it abstains on their completions (abstain_frac/fn in metrics.jsonl); with every prompt lacking "
               "it, the run stops after 3 steps without a score (run.hacking_patience)")
    checked = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert checked.returncode == 0 and warning in checked.stderr, checked.stderr
    done = run_cli("run", str(write_recipe(tmp_path, data)), "run.steps=4")
    message = error_line(done, during_run=True)
    assert message == ("zenalign: error: rewards[0] 'fn' (python_function) scored no completion (every score NaN or None) "
                       "for objective 'fn' in 3 consecutive steps (steps 1-3); check what it returns "
                       "(run.hacking_patience sets the number of steps, 0 turns this check off)")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["abstain_frac/fn"] for m in metrics] == [1.0, 1.0]  # steps 1 and 2 written; step 3 stopped the run
