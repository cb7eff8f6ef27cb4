"""The Python API: the paper's snippet as written, reward lists, errors, and parity with the CLI."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from helpers import RECIPES, REVERSE_POLICY, run_cli
from zenalign import GRPOTrainer, load_recipe
from zenalign.errors import RecipeError

PROMPTS = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in ["abc", "hello", "xyz", "kite", "moon", "tree", "sun", "leaf"]]


@pytest.mark.slow
def test_the_papers_snippet_works_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory is runs/grpo-<time> under the working directory
    # The shipped 1M policy ends its answers after a few tokens, so 100 default steps stay quick.
    model = AutoModelForCausalLM.from_pretrained(REVERSE_POLICY)

    def reward_model(completions, answer):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    prompts = PROMPTS

    result = GRPOTrainer(model=model, reward_model=reward_model, group_size=12, clip_epsilon=0.15).train(prompts)

    recipe = yaml.safe_load((result.output_dir / "recipe.yaml").read_text())
    assert recipe["sampling"]["group_size"] == 12 and recipe["loss"]["clip_epsilon"] == 0.15  # clip_epsilon= sets the loss's option
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == recipe["run"]["steps"] == 100
    assert metrics[-1]["samples"] == 100 * 8 * 12  # default 8 prompts per step, 12 completions each
    assert result.output_dir.parent.name == "runs"


def test_a_list_of_rewards_gives_one_objective_each(tmp_path, tiny_model_dir):
    def exact(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    def short(completion_ids):
        return [-float(len(ids)) for ids in completion_ids]

    trainer = GRPOTrainer(
        model=str(tiny_model_dir), reward_model=[exact, short], steps=1, group_size=2, prompts_per_step=2,
        max_new_tokens=4, output_dir=str(tmp_path / "run"), progress_bar=False,
    )
    trainer.train(PROMPTS)
    assert trainer.objectives.names == ("exact", "short")
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert {"reward_mean/exact", "reward_mean/short"} <= set(metrics)


def test_options_are_recipe_fields_and_typos_are_errors():
    with pytest.raises(RecipeError, match="GRPOTrainer: unknown option 'group_sise'"):
        GRPOTrainer(model="unused", reward_model=len, group_sise=4)
    with pytest.raises(RecipeError, match="sampling.group_size: must be >= 2"):
        GRPOTrainer(model="unused", reward_model=len, group_size=1)
    trainer = GRPOTrainer(model="some/dir", reward_model=len, kl_coef=0.0, sampling={"top_p": 0.9}, normalizer="rank")
    assert trainer.recipe.grpo.kl_coef == 0.0 and trainer.recipe.sampling.top_p == 0.9
    assert trainer.recipe.model.path == "some/dir" and trainer.recipe.normalizer.type == "rank"


def test_flat_fields_and_section_dicts_merge_and_conflicts_are_named():
    """Issue 19: `steps=3, log_interval=1, run={"overwrite": True}` ran 100 steps (the section
    replaced the flat fields), and `steps=3, run={"steps": 7}` silently took 7."""
    trainer = GRPOTrainer(model="m", reward_model=len, steps=3, log_interval=1, run={"overwrite": True})
    run = trainer.recipe.run
    assert (run.steps, run.log_interval, run.overwrite) == (3, 1, True)
    trainer = GRPOTrainer(model="m", reward_model=len, run={"overwrite": True}, steps=3)  # either order
    assert (trainer.recipe.run.steps, trainer.recipe.run.overwrite) == (3, True)
    with pytest.raises(RecipeError, match=r"steps=3 and run=\{'steps': 7\} both set run.steps \(3 vs 7\); give it once"):
        GRPOTrainer(model="m", reward_model=len, steps=3, run={"steps": 7})
    trainer = GRPOTrainer(model="m", reward_model=len, steps=3, run={"steps": 3})  # the same value twice is fine
    assert trainer.recipe.run.steps == 3


@pytest.mark.slow
def test_api_and_cli_run_the_same_engine(tmp_path):
    """The same recipe through `zenalign run` (a subprocess) and GRPOTrainer.from_recipe gives
    the same rewards and losses step by step."""
    overrides = ["run.steps=4", "run.eval_interval=0", "data.eval_size=16", "run.progress_bar=false"]
    cli_dir, api_dir = tmp_path / "cli", tmp_path / "api"
    done = run_cli("run", str(RECIPES / "quickstart.yaml"), *overrides, f"run.output_dir={cli_dir}")
    assert done.returncode == 0, done.stderr
    GRPOTrainer.from_recipe(load_recipe(RECIPES / "quickstart.yaml", [*overrides, f"run.output_dir={api_dir}"])).train()
    read = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    for via_cli, via_api in zip(read(cli_dir), read(api_dir), strict=True):
        for key in ("samples", "reward_mean", "reward_std", "zero_std_frac", "completion_len"):
            assert via_cli[key] == via_api[key], key
        for key in ("loss", "kl", "grad_norm"):
            assert via_cli[key] == pytest.approx(via_api[key], rel=1e-5, abs=1e-7), key


def test_model_directory_is_used_by_path():
    trainer = GRPOTrainer(model=str(REVERSE_POLICY), reward_model=len)
    assert trainer.recipe.model.path == str(REVERSE_POLICY)


def test_save_model_writes_the_policy_as_trl_does(tmp_path, tiny_model_dir):
    """Issue 35: TRL's trainer.save_model(dir): the trained policy and its tokenizer, loadable with
    from_pretrained; the run directory itself (TRL's output_dir) means the run's final/."""
    from transformers import AutoTokenizer

    from zenalign.errors import ModelLoadError

    def token_sum(completion_ids):  # a dense reward: every group varies, so the step moves the weights
        return [float(sum(ids) % 7) for ids in completion_ids]

    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=token_sum, steps=1, group_size=4, prompts_per_step=2,
                          max_new_tokens=6, learning_rate=0.05, kl_coef=0.0, output_dir=str(tmp_path / "run"),
                          progress_bar=False)
    with pytest.raises(RecipeError, match=r"^save_model: the policy is built by train\(\); call train\(\) first$"):
        trainer.save_model(tmp_path / "early")
    trainer.train(PROMPTS)
    assert trainer.save_model(tmp_path / "saved") == tmp_path / "saved"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    trained = trainer.model.state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in trained)
    assert any(not torch.equal(saved[k], initial[k]) for k in initial)  # the trained weights, not the initial ones
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")("abc").input_ids == trainer.tokenizer("abc").input_ids
    assert trainer.save_model() == trainer.save_model(str(tmp_path / "run")) == tmp_path / "run" / "final"
    with pytest.raises(ModelLoadError, match=f"save_model: '{tmp_path / 'saved'}' already exists and is not empty"):
        trainer.save_model(tmp_path / "saved")
    with pytest.raises(RecipeError, match=r"save_model\(merge=True\): the policy has no LoRA adapters to merge"):
        trainer.save_model(tmp_path / "merged", merge=True)


def test_the_api_prints_what_the_cli_prints(tmp_path, tiny_model_dir, capfd):
    """Issue 35: GRPOTrainer.train() printed nothing while `zenalign run` shows its step and eval
    lines and a summary. Both now print the same (here not on a terminal: plain lines, no bar);
    TRL's log_level silences it."""
    def exact(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    def run(name, **options):
        trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=exact, max_steps=2, logging_steps=1,
                              num_generations=2, prompts_per_step=2, max_completion_length=4,
                              output_dir=str(tmp_path / name), train_dataset=PROMPTS, eval_dataset=PROMPTS[:2], **options)
        return trainer.train(), capfd.readouterr()

    result, (out, err) = run("shown")
    before, after = result.initial_eval["eval/reward_mean/exact"], result.final_eval["eval/reward_mean/exact"]
    assert out == (f"eval exact: {before:.3f} -> {after:.3f} (step 0 -> 2)\n"
                   f"run directory: {tmp_path / 'shown'} (final policy in {tmp_path / 'shown' / 'final'})\n")
    lines = err.splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert [line.split(":")[0] for line in lines if line.startswith("eval at")] == ["eval at step 0", "eval at step 2"]
    assert "\r" not in err and "GRPO:" not in err  # stderr is not a terminal here: no bar
    run_log = (tmp_path / "shown" / "run.log").read_text()
    assert all(line in run_log for line in lines if line.startswith(("step ", "eval at")))

    result, (out, err) = run("quiet", log_level="warning")  # `zenalign run -q`: the summary alone
    assert out.startswith("eval exact:") and "step 1/2" not in err and "step 1/2" in (tmp_path / "quiet" / "run.log").read_text()
    assert run("silent", log_level="error")[1] == ("", "")


def test_on_a_terminal_the_api_shows_the_progress_bar(tmp_path, tiny_model_dir):
    """With stderr a terminal (a pseudo-terminal here), train() draws tqdm's bar with the step lines
    printed above it, as `zenalign run` does; TRL's disable_tqdm=True leaves the lines alone."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios
    import threading

    (tmp_path / "train.py").write_text(
        "import sys\nfrom zenalign import GRPOTrainer\n"
        "for name, hide in (('bar', False), ('nobar', True)):\n"
        "    print(f'=== {name}', file=sys.stderr, flush=True)\n"
        f"    GRPOTrainer(model={str(tiny_model_dir)!r}, reward_funcs=lambda completions: [1.0] * len(completions),\n"
        "                max_steps=2, logging_steps=1, num_generations=2, prompts_per_step=2, max_completion_length=4,\n"
        f"                output_dir={str(tmp_path)!r} + '/' + name, disable_tqdm=hide).train(['a', 'b'])\n")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns (0: tqdm draws nothing)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "train.py")], stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)
    chunks = []

    def read():
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    assert proc.wait(timeout=300) == 0
    reader.join(timeout=30)
    os.close(leader)
    shown = b"".join(chunks).decode(errors="replace")
    with_bar, without = shown.split("=== nobar")
    assert "GRPO: 100%" in with_bar and "\r" in with_bar and "step 2/2" in with_bar
    assert "GRPO:" not in without and "step 2/2" in without
