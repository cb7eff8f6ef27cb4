"""Coming from TRL: its data formats, reward functions and option names, written as TRL's docs write
them (with a local tiny model and local data instead of the Hub), and local Hugging Face datasets."""

import json
import re

import pytest
import yaml
from datasets import Dataset, DatasetDict

from conftest import byte_tokenizer, run_cli
from zenalign import GRPOTrainer
from zenalign.errors import RecipeError

# one step, 2 prompts x 2 completions of 4 tokens, no evaluation
RUN = dict(prompts_per_step=2, max_steps=1, max_completion_length=4, eval_interval=0, progress_bar=False, beta=0.0,
           logging_steps=1)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def test_a_conversational_dataset_and_trl_style_rewards(tmp_path, tiny_model_dir):
    """TRL's docs: a conversational dataset (`prompt` = list of messages), a format reward reading
    `completion[0]["content"]`, and a reward reading a dataset column by name."""
    seen = {}

    def format_reward_func(completions, **kwargs):
        """Reward function that checks if the completion has a specific format (TRL's docs)."""
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        seen.update(kwargs, completions=completions)
        return [1.0 if match else 0.0 for match in matches]

    def reward_len(completions, ground_truth, **kwargs):
        return [-abs(len(completion[0]["content"]) - len(truth)) for completion, truth in zip(completions, ground_truth)]

    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": "What color is the sky?"}], "ground_truth": "blue"},
        {"prompt": [{"role": "user", "content": "Where is the sun?"}], "ground_truth": "up"},
    ])
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=[format_reward_func, reward_len], processing_class=tokenizer,
                          train_dataset=dataset, reward_weights=[2.0, 0.5], num_generations=2,
                          output_dir=str(tmp_path / "run"), **RUN)
    trainer.train()
    assert len(seen["completions"]) == 4
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
               for c in seen["completions"])
    assert seen["prompts"][0] == [{"role": "user", "content": "What color is the sky?"}] == seen["prompts"][1]
    assert seen["ground_truth"] == ["blue", "blue", "up", "up"]
    assert len(seen["completion_ids"]) == 4 and all(isinstance(i, int) for i in seen["completion_ids"][0])
    assert trainer.objectives.names == ("format_reward_func", "reward_len")
    assert trainer.objectives.weights.tolist() == [2.0, 0.5]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == "user: What color is the sky?\nassistant:"  # through the chat template


def test_a_standard_dataset_gets_plain_strings(tmp_path, tiny_model_dir):
    """TRL's docs, standard format: `reward_func(completions, ground_truth, **kwargs)` on strings."""
    seen = {}

    def reward_func(completions, ground_truth, **kwargs):
        # Regular expression to capture content inside \boxed{}
        matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
        contents = [match.group(1) if match else "" for match in matches]
        seen.update(kwargs, completions=completions)
        # Reward 1 if the content is the same as the ground truth, 0 otherwise
        return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]

    dataset = Dataset.from_list([{"prompt": "The sky is", "ground_truth": "blue"},
                                 {"prompt": "The sun is", "ground_truth": "up"}])
    GRPOTrainer(model=str(tiny_model_dir), reward_funcs=reward_func, train_dataset=dataset, num_generations=2,
                output_dir=str(tmp_path / "run"), **RUN).train()
    assert all(isinstance(c, str) for c in seen["completions"])
    assert seen["prompts"] == ["The sky is", "The sky is", "The sun is", "The sun is"]


def test_trl_option_names_map_to_zenalign_fields():
    trainer = GRPOTrainer(model="m", reward_funcs=len, beta=0.04, num_generations=4, max_completion_length=64,
                          epsilon=0.2, epsilon_high=0.28, num_iterations=2, learning_rate=1e-6, max_steps=5,
                          loss_type="dr_grpo", scale_rewards=False, logging_steps=3, save_steps=4, temperature=0.9)
    r = trainer.recipe
    assert (r.grpo.kl_coef, r.sampling.group_size, r.sampling.max_new_tokens) == (0.04, 4, 64)
    assert (r.grpo.clip_epsilon, r.grpo.clip_epsilon_high, r.grpo.num_iterations, r.grpo.learning_rate) == (0.2, 0.28, 2, 1e-6)
    assert (r.run.steps, r.run.log_interval, r.run.checkpoint_interval, r.sampling.temperature) == (5, 3, 4, 0.9)
    assert r.grpo.loss_aggregation == "dr_grpo" and r.normalizer.type == "dr_grpo"
    r = GRPOTrainer(model="m", reward_funcs=len, loss_type="bnpo", scale_rewards="batch").recipe
    assert r.grpo.loss_aggregation == "dapo" and (r.normalizer.type, r.normalizer.center) == ("batch_zscore", "group")
    r = GRPOTrainer(model="m", reward_funcs=len, loss_type="grpo", scale_rewards=True).recipe
    assert r.grpo.loss_aggregation == "grpo" and r.normalizer.type == "group_zscore"
    assert GRPOTrainer(model="m", reward_funcs=len, loss_type="cispo").recipe.loss.type == "cispo"
    with pytest.raises(RecipeError, match="loss_type='sapo' \\(TRL\\) has no zenalign equivalent; accepted: grpo, bnpo"):
        GRPOTrainer(model="m", reward_funcs=len, loss_type="sapo")
    with pytest.raises(RecipeError, match="beta \\(TRL's name\\) and kl_coef both set kl_coef; give it once"):
        GRPOTrainer(model="m", reward_funcs=len, beta=0.1, kl_coef=0.2)
    with pytest.raises(RecipeError, match="give reward_model or TRL's name for it, reward_funcs, not both"):
        GRPOTrainer(model="m", reward_model=len, reward_funcs=len)


def test_reward_weights_must_match_the_reward_functions(tmp_path, tiny_model_dir):
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=[len, len], reward_weights=[1.0],
                          train_dataset=["a", "b"], num_generations=2, output_dir=str(tmp_path / "run"), **RUN)
    with pytest.raises(RecipeError, match="reward_weights has 1 entries but 2 reward function\\(s\\) were given"):
        trainer.train()


# --------------------------------------------------------------------------------------- data.type hf

def hf_recipe(tmp_path, tiny_model_dir, data):
    recipe = {"model": {"path": str(tiny_model_dir)}, "data": {"type": "hf", **data},
              "sampling": {"group_size": 2, "max_new_tokens": 4}, "grpo": {"prompts_per_step": 2, "kl_coef": 0.0},
              "rewards": [{"type": "exact_answer"}],
              "run": {"steps": 1, "eval_interval": 0, "progress_bar": False, "output_dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


ROWS = [{"question": f"reverse {w}:", "answer": w[::-1]} for w in ("abc", "dog", "tree", "sun", "moon", "leaf")]


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "csv", "jsonl"])
def test_hf_data_reads_local_datasets(tmp_path, tiny_model_dir, kind):
    whole = Dataset.from_list(ROWS)
    if kind == "save_to_disk":
        DatasetDict({"train": whole.select(range(4)), "test": whole.select(range(4, 6))}).save_to_disk(tmp_path / "ds")
        data = {"path": "ds", "eval_split": "test"}
    else:
        (tmp_path / "ds").mkdir()
        for split, part in (("train", whole.select(range(4))), ("test", whole.select(range(4, 6)))):
            target = tmp_path / "ds" / f"{split}.{kind}"
            {"parquet": part.to_parquet, "csv": part.to_csv, "jsonl": part.to_json}[kind](str(target))
        data = {"path": "ds", "eval_split": "test"}
    from types import SimpleNamespace

    from zenalign_plugins.hf_datasets import HFOptions, HFTask

    task = HFTask(HFOptions(**data, prompt_field="question"), SimpleNamespace(resolve_path=lambda p: tmp_path / p))
    assert [r["prompt"] for r in task.train_prompts()] == [r["question"] for r in ROWS[:4]]  # the train split
    assert [r["prompt"] for r in task.eval_prompts()] == [r["question"] for r in ROWS[4:]]  # the test split
    assert [r["answer"] for r in task.eval_prompts()] == [r["answer"] for r in ROWS[4:]]  # every column, by name
    if kind != "save_to_disk":
        return
    recipe = hf_recipe(tmp_path, tiny_model_dir, {**data, "prompt_field": "question"})  # once end to end, by the CLI
    assert run_cli("validate", str(recipe)).returncode == 0
    done = run_cli("run", str(recipe), "run.log_interval=1")
    assert done.returncode == 0, done.stderr
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    trained = {s["prompt"] for s in samples if not s.get("eval")}
    evaluated = {s["prompt"] for s in samples if s.get("eval")}
    assert trained and trained <= {r["question"] for r in ROWS[:4]}
    assert evaluated and evaluated <= {r["question"] for r in ROWS[4:]}


@pytest.mark.parametrize("data, expected", [
    ({"path": "ds", "split": "validation"}, "data.path: '{ds}' has no split 'validation'; splits: train"),
    ({"path": "ds", "prompt_field": "text"}, "data.path: the dataset has no column 'text' (prompt_field); columns: question, answer"),
    ({"path": "someone/some-dataset"}, "'{tmp}/someone/some-dataset' does not exist; give a save_to_disk directory or a local data file"),
])
def test_hf_data_errors_are_one_line(tmp_path, tiny_model_dir, data, expected):
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "ds")
    done = run_cli("validate", str(hf_recipe(tmp_path, tiny_model_dir, data)))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert expected.format(ds=tmp_path / "ds", tmp=tmp_path) in done.stderr.strip().splitlines()[-1]


def test_python_function_rewards_are_named_after_their_functions(tmp_path, tiny_model_dir):
    """Issue 35: two python_function rewards without `name:` both took the type's name (and
    clashed); they take their functions' names, as GRPOTrainer(reward_funcs=[...]) names them."""
    (tmp_path / "my_rewards.py").write_text("def reward_len(completions, **kwargs):\n"
                                            "    return [-float(len(c)) for c in completions]\n\n"
                                            "def always_one(completions, **kwargs):\n"
                                            "    return [1.0] * len(completions)\n")
    recipe = {"model": {"path": str(tiny_model_dir)}, "data": {"type": "inline", "prompts": ["a", "b"], "eval_prompts": []},
              "sampling": {"group_size": 2, "max_new_tokens": 4}, "grpo": {"prompts_per_step": 2},
              "rewards": [{"type": "python_function", "function": "my_rewards.py:reward_len"},
                          {"type": "python_function", "function": "my_rewards.py:always_one", "name": "one"},
                          {"type": "python_function", "function": "my_rewards.py:always_one"}],
              "run": {"steps": 1, "output_dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    checked = run_cli("validate", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "rewards: reward_len [python_function], one [python_function], always_one [python_function];" in checked.stdout
    done = run_cli("run", str(path))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert metrics["reward_mean/one"] == metrics["reward_mean/always_one"] == 1.0
    assert metrics["reward_mean/reward_len"] <= 0.0
