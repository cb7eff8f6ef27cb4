"""Coming from TRL: its data formats, reward functions and option names, written as TRL's docs write
them (with a local tiny model and local data instead of the Hub), and local Hugging Face datasets."""

import importlib.util
import json
import re

import pytest
import yaml
from datasets import Dataset, DatasetDict

from helpers import REPO, byte_tokenizer, run_cli
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
    assert (r.loss.clip_epsilon, r.loss.clip_epsilon_high, r.grpo.num_iterations, r.grpo.learning_rate) == (0.2, 0.28, 2, 1e-6)
    assert (r.run.steps, r.run.log_interval, r.run.checkpoint_interval, r.sampling.temperature) == (5, 3, 4, 0.9)
    assert r.loss.aggregation == "dr_grpo" and r.normalizer.type == "dr_grpo"
    r = GRPOTrainer(model="m", reward_funcs=len, loss_type="bnpo", scale_rewards="batch").recipe
    assert r.loss.aggregation == "dapo" and (r.normalizer.type, r.normalizer.center) == ("batch_zscore", "group")
    r = GRPOTrainer(model="m", reward_funcs=len, loss_type="grpo", scale_rewards=True).recipe
    assert r.loss.aggregation == "grpo" and r.normalizer.type == "group_zscore"
    assert GRPOTrainer(model="m", reward_funcs=len, loss_type="cispo").recipe.loss.type == "cispo"
    with pytest.raises(RecipeError, match="loss_type='sapo' \\(TRL\\) has no zenalign equivalent; accepted: grpo, bnpo"):
        GRPOTrainer(model="m", reward_funcs=len, loss_type="sapo")
    with pytest.raises(RecipeError, match="beta=0.1 \\(TRL's name for grpo.kl_coef\\) and kl_coef=0.2 both set "
                                          "grpo.kl_coef \\(0.1 vs 0.2\\); give it once"):
        GRPOTrainer(model="m", reward_funcs=len, beta=0.1, kl_coef=0.2)
    assert GRPOTrainer(model="m", reward_funcs=len, beta=0.1, kl_coef=0.1).recipe.grpo.kl_coef == 0.1  # the same value
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


# --------------------------------------------------------------------------------------- GRPOConfig's fields

# A value for every field with a zenalign equivalent, and what it sets (TRL's value -> the recipe).
MAPPED = {
    "trust_remote_code": (True, {"model.trust_remote_code": True}),
    "max_prompt_length": (32, {"sampling.max_prompt_length": 32}),
    "num_generations": (4, {"sampling.group_size": 4}),
    "max_completion_length": (16, {"sampling.max_new_tokens": 16}),
    "max_steps": (5, {"run.steps": 5}),
    "per_device_train_batch_size": (4, {"engine.micro_batch_size": 4}),
    "num_iterations": (2, {"grpo.num_iterations": 2}),
    "per_device_eval_batch_size": (16, {"run.eval_batch_size": 16}),
    "temperature": (0.7, {"sampling.temperature": 0.7}),
    "top_p": (0.9, {"sampling.top_p": 0.9}),
    "top_k": (5, {"sampling.top_k": 5}),
    "num_generations_eval": (4, {"run.eval_group_size": 4}),
    "use_vllm": (True, {"sampling.decoder": "vllm"}),
    "vllm_mode": ("colocate", {"sampling.decoder": "zenalign"}),
    "vllm_enable_sleep_mode": (True, {"sampling.vllm.enable_sleep_mode": True}),
    "vllm_gpu_memory_utilization": (0.5, {"sampling.vllm.gpu_memory_utilization": 0.5}),
    "vllm_max_model_length": (256, {"sampling.vllm.max_model_len": 256}),
    "vllm_tensor_parallel_size": (2, {"sampling.vllm.tensor_parallel_size": 2}),
    "vllm_importance_sampling_correction": (False, {"sampling.vllm_is_correction.mode": "off"}),
    "vllm_importance_sampling_mode": ("sequence_mask", {"sampling.vllm_is_correction.mode": "sequence_mask"}),
    "vllm_importance_sampling_clip_max": (3.0, {"sampling.vllm_is_correction.cap": 3.0}),
    "vllm_importance_sampling_cap": (2.5, {"sampling.vllm_is_correction.cap": 2.5}),
    "beta": (0.04, {"grpo.kl_coef": 0.04}),
    "max_tool_calling_iterations": (2, {"environment.max_turns": 3}),
    "epsilon": (0.1, {"loss.clip_epsilon": 0.1}),
    "epsilon_high": (0.28, {"loss.clip_epsilon_high": 0.28}),
    "loss_type": ("bnpo", {"loss.aggregation": "dapo"}),
    "scale_rewards": ("batch", {"normalizer.type": "batch_zscore", "normalizer.center": "group"}),
    "multi_objective_aggregation": ("normalize_then_sum", {"normalizer.type": "normalize_then_sum"}),
    "reward_weights": ([2.0], {"rewards.0.weight": 2.0}),
    "importance_sampling_level": ("sequence", {"loss.type": "gspo"}),
    "mask_truncated_completions": (True, {"filters.0.type": "mask_truncated"}),
    "top_entropy_quantile": (0.2, {"grpo.top_entropy_quantile": 0.2}),
    "learning_rate": (3e-6, {"grpo.learning_rate": 3e-6}),
    "lr_scheduler_type": ("constant_with_warmup", {"grpo.lr_schedule": "constant"}),
    "warmup_steps": (5, {"grpo.warmup_steps": 5}),
    "weight_decay": (0.1, {"grpo.weight_decay": 0.1}),
    "adam_beta1": (0.8, {"grpo.adam_betas": (0.8, 0.999)}),
    "adam_beta2": (0.95, {"grpo.adam_betas": (0.9, 0.95)}),
    "max_grad_norm": (0, {"engine.max_grad_norm": None}),
    "bf16": (True, {"engine.precision": "bf16"}),
    "gradient_checkpointing": (True, {"engine.gradient_checkpointing": True}),
    "activation_checkpointing": (True, {"engine.gradient_checkpointing": True}),
    "use_cpu": (True, {"engine.device": "cpu"}),
    "ddp_timeout": (60, {"engine.collective_timeout_s": 60.0}),
    "eval_strategy": ("no", {"run.eval_interval": 0}),
    "eval_steps": (5, {"run.eval_interval": 5}),
    "output_dir": ("somewhere", {"run.output_dir": "somewhere"}),
    "logging_steps": (3, {"run.log_interval": 3}),
    "log_level": ("critical", {"run.log_level": "error"}),
    "disable_tqdm": (True, {"run.progress_bar": False}),
    "report_to": ("tensorboard", {"run.report_to": ["tensorboard"]}),
    "run_name": ("trial-1", {"run.name": "trial-1"}),
    "log_completions": (False, {"run.log_samples": 0}),
    "save_strategy": ("no", {"run.checkpoint_interval": 0}),
    "save_steps": (4, {"run.checkpoint_interval": 4}),
    "save_total_limit": (3, {"run.keep_checkpoints": 3}),
    "seed": (7, {"run.seed": 7}),
}


def recipe_value(recipe, path):
    node = recipe
    for key in path.split("."):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


def test_every_grpo_config_field_is_mapped_or_refused_with_a_reason():
    """The table the code applies (zenalign/recipe/trl_fields.py) covers TRL's GRPOConfig, field by
    field, as installed (TRL 1.16 on transformers 5), and docs/from-trl.md shows that very table."""
    import dataclasses

    from zenalign.recipe.docs import trl_table
    from zenalign.recipe.trl_fields import GRPO_CONFIG

    trl = pytest.importorskip("trl", reason="trl not installed (pip install 'zenalign[test]')")
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    assert fields - set(GRPO_CONFIG) == set(), "GRPOConfig fields missing from zenalign/recipe/trl_fields.py"
    assert {name for name, field in GRPO_CONFIG.items() if name not in fields} == \
        {name for name, field in GRPO_CONFIG.items() if field.legacy}  # the others are marked as older versions'
    for name, field in GRPO_CONFIG.items():
        assert field.target or len(field.note.split()) >= 3, f"{name}: no equivalent and no reason"
    mapped = {name for name in fields if GRPO_CONFIG[name].target}
    assert mapped | {"max_prompt_length"} == set(MAPPED)  # every mapping is exercised below
    print(f"GRPOConfig ({len(fields)} fields): {len(mapped)} mapped, {len(fields) - len(mapped)} refused with a reason")
    doc = (REPO / "docs" / "from-trl.md").read_text()
    assert trl_table() in doc, "regenerate the table in docs/from-trl.md: zenalign schema --format trl"
    assert (f"{len(mapped)} of the {len(fields)} map to a zenalign field, {len(fields) - len(mapped)} have no "
            f"equivalent") in " ".join(doc.split())  # the counts the page states


@pytest.mark.parametrize("name", sorted(MAPPED))
def test_a_trl_name_sets_its_field_in_the_api_a_recipe_and_an_override(name, tmp_path):
    from zenalign.recipe.loader import validate_recipe

    value, expected = MAPPED[name]
    base = {"model": {"path": "m"}, "rewards": [{"type": "length"}]}
    ways = {"top level": validate_recipe({**base, name: value}, "r.yaml", tmp_path, "r").recipe,
            "grpo section": validate_recipe({**base, "grpo": {name: value}}, "r.yaml", tmp_path, "r").recipe,
            "override": validate_recipe(base, "r.yaml", tmp_path, "r", [f"{name}={json.dumps(value)}"]).recipe}
    if name != "reward_weights":  # the API's reward_weights weigh the functions it is given
        ways["GRPOTrainer"] = GRPOTrainer(model="m", reward_funcs=len, rewards=base["rewards"], **{name: value}).recipe
    for way, recipe in ways.items():
        for path, want in expected.items():
            assert recipe_value(recipe, path) == want, (way, path)


def refused_fields():
    from zenalign.recipe.trl_fields import GRPO_CONFIG

    return sorted(name for name, field in GRPO_CONFIG.items() if not field.target)


@pytest.mark.parametrize("name", refused_fields())
def test_a_field_without_an_equivalent_is_refused_with_its_reason(name):
    from zenalign.recipe.trl_fields import ANY, GRPO_CONFIG

    field = GRPO_CONFIG[name]
    plain = GRPOTrainer(model="m", reward_funcs=len, max_steps=3).recipe.model_dump()
    if ANY in field.accepts:  # a field zenalign has no use for, whatever it says (do_train, local_rank)
        assert GRPOTrainer(model="m", reward_funcs=len, max_steps=3, **{name: "unusual"}).recipe.model_dump() == plain
        return
    with pytest.raises(RecipeError) as caught:
        GRPOTrainer(model="m", reward_funcs=len, **{name: "unusual"})
    message = str(caught.value)
    assert message.startswith(f"GRPOTrainer: {name}='unusual' (TRL) has no zenalign equivalent: {field.note}")
    assert "\n" not in message
    for value in field.accepts:  # values that ask for nothing are taken, and change nothing
        assert GRPOTrainer(model="m", reward_funcs=len, max_steps=3, **{name: value}).recipe.model_dump() == plain


def test_trl_names_in_a_recipe_and_overrides_follow_the_conflict_rule(tmp_path, tiny_model_dir):
    """Issue 35: `grpo.beta` was an unknown field. TRL's names work in recipe files and overrides;
    a TRL name and its field given different values in one file is a one-line error naming both,
    an override replaces the file's value under either name, and two overrides that disagree are
    refused like any two spellings of one field."""
    from zenalign import load_recipe

    path = tmp_path / "recipe.yaml"
    recipe = {"model": {"path": str(tiny_model_dir)}, "data": {"type": "inline", "prompts": ["a", "b"]},
              "grpo": {"kl_coef": 0.1, "beta": 0.02}, "rewards": [{"type": "length"}]}
    path.write_text(yaml.safe_dump(recipe))
    done = run_cli("validate", str(path))
    assert done.returncode == 2 and done.stderr == (f"zenalign: error: {path}: grpo.kl_coef and grpo.beta (TRL's name for "
                                                    f"grpo.kl_coef) both set grpo.kl_coef (0.1 vs 0.02); give it once\n")
    recipe["grpo"] = {"kl_coef": 0.1}
    path.write_text(yaml.safe_dump(recipe))
    assert load_recipe(path, ["grpo.beta=0.05"]).recipe.grpo.kl_coef == 0.05
    assert load_recipe(path, ["beta=0.05", "beta=0.07"]).recipe.grpo.kl_coef == 0.07  # the same key again: the last
    with pytest.raises(RecipeError, match=r"^override 'beta=0.05' and override 'grpo.kl_coef=0.06' both set "
                                          r"grpo.kl_coef \(0.05 vs 0.06\); give it once$"):
        load_recipe(path, ["beta=0.05", "grpo.kl_coef=0.06"])
    done = run_cli("validate", str(path), "grpo.sync_ref_model=true")
    assert done.returncode == 2 and done.stderr.startswith(
        "zenalign: error: override 'grpo.sync_ref_model=true': grpo.sync_ref_model=True (TRL) has no zenalign "
        "equivalent: TR-DPO's reference mixing is not implemented")
    with pytest.raises(RecipeError, match=r"num_train_epochs=2 \(TRL\) has no zenalign equivalent: zenalign counts steps"):
        load_recipe(path, ["num_train_epochs=2"])
    assert load_recipe(path, ["num_train_epochs=2", "max_steps=9"]).recipe.run.steps == 9  # TRL lets max_steps win
    with pytest.raises(RecipeError, match=r"reward_weights=\[1, 2\]' gives 2 weights, but the recipe has 1 rewards"):
        load_recipe(path, ["reward_weights=[1, 2]"])
    with pytest.raises(RecipeError, match=r"^adam_betas=\(0.1, 0.2\) and adam_beta1=0.5 \(TRL's name for "
                                          r"grpo.adam_betas\[0\]\) both set grpo.adam_betas.0 \(0.1 vs 0.5\)"):
        GRPOTrainer(model="m", reward_funcs=len, adam_betas=(0.1, 0.2), adam_beta1=0.5)  # one item of a pair
    installed = [name for name in ("tensorboard", "wandb", "mlflow", "trackio") if importlib.util.find_spec(name)]
    assert load_recipe(path, ["report_to=all"]).recipe.run.report_to == installed  # TRL's "all": every installed one
    assert load_recipe(path, ["report_to=none"]).recipe.run.report_to == []


def test_a_recipe_in_trl_names_runs(tmp_path, tiny_model_dir):
    """A recipe written with TRL's names runs as the same recipe in zenalign's (recipe.yaml in the run
    directory records the fields they set); max_prompt_length truncates a long prompt, and says so."""
    (tmp_path / "my_rewards.py").write_text("def reward_len(prompts, completions, **kwargs):\n"
                                            "    assert all(p.startswith('a long prompt') for p in prompts)  # whole\n"
                                            "    return [-float(len(c)) for c in completions]\n")
    recipe = {"model": {"path": str(tiny_model_dir)},
              "data": {"type": "inline", "prompts": ["a long prompt of forty bytes, as it were", "a long prompt: two"],
                       "eval_prompts": []},
              "rewards": [{"type": "python_function", "function": "my_rewards.py:reward_len"}],
              "grpo": {"prompts_per_step": 2, "beta": 0.0, "loss_type": "dr_grpo"},
              "num_generations": 2, "max_completion_length": 4, "max_steps": 2, "logging_steps": 1,
              "mask_truncated_completions": True, "report_to": "none", "max_prompt_length": 24,
              "output_dir": str(tmp_path / "run"), "disable_tqdm": True}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = run_cli("run", str(path))
    assert done.returncode == 0, done.stderr
    assert ("sampling.max_prompt_length: 1 of 2 prompts are longer than 24 tokens; they keep their last 24 "
            "(sampling.long_prompts: truncate)") in done.stderr
    written = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert (written["sampling"]["group_size"], written["sampling"]["max_new_tokens"], written["run"]["steps"]) == (2, 4, 2)
    assert (written["grpo"]["kl_coef"], written["loss"]["aggregation"], written["filters"]) == \
        (0.0, "dr_grpo", [{"type": "mask_truncated"}])
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    done = run_cli("validate", str(path), "sampling.long_prompts=refuse")
    assert done.returncode == 2 and done.stderr == (
        "zenalign: error: sampling.max_prompt_length: 1 prompt(s) are longer than 24 tokens, the longest (prompts[0]) "
        "40; shorten them, raise max_prompt_length, or set sampling.long_prompts: truncate (each keeps its last 24 "
        "tokens)\n")
