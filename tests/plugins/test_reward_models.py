"""Learned reward models, reward-model training, constitutional rewards, critique-revise and
online preference learning, with tiny real models."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import RECIPES, byte_tokenizer, cli_in_process, run_cli
from zenalign.errors import DataError, ModelLoadError, RecipeError
from zenalign.plugins import BuildContext, ScoreBatch
from zenalign.plugins import collect_registry
from zenalign.recipe.schema import Recipe
from zenalign.models.reward_model import read_preferences


def tiny_classifier(tmp_path: Path, num_labels: int = 1, seed: int = 0, labels=None) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, pad_token_id=0, eos_token_id=1, bos_token_id=None, num_labels=num_labels)
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {v: k for k, v in config.id2label.items()}
    path = tmp_path / f"rm-{num_labels}"
    LlamaForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


def build(kind, name, context=None, **options):
    plugin_type = collect_registry().get(kind, name)
    return plugin_type.build(plugin_type.options(**options), context)


def context(base: Path):
    return BuildContext(recipe=Recipe(), base_dir=base)


BATCH = ScoreBatch(prompts=["reverse abc:", "reverse abc:", "reverse kite:", "reverse kite:"],
                   completions=["cba", "abc", "etik", "a much longer completion"], group_size=2)


# ---------------------------------------------------------------------------------------- learned_rm

def test_learned_rm_scores_equal_a_direct_forward_pass(tmp_path):
    from transformers import AutoModelForSequenceClassification

    path = tiny_classifier(tmp_path)
    source = build("reward", "learned_rm", context(tmp_path), path=str(path), batch_size=3)
    got = source.score(BATCH)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = byte_tokenizer()
    for score, prompt, completion in zip(got, BATCH.prompts, BATCH.completions):
        ids = tokenizer(prompt + completion, return_tensors="pt")  # one text at a time: no padding at all
        with torch.no_grad():
            assert score == pytest.approx(float(model(**ids).logits[0, 0]), abs=1e-5)
    assert not hasattr(source, "objectives")  # one label: one objective, named by its recipe entry


def test_multi_label_rm_gives_one_objective_per_label(tmp_path):
    path = tiny_classifier(tmp_path, num_labels=2, labels=["helpful", "harmless"])
    source = build("reward", "learned_rm", context(tmp_path), path=str(path))
    assert source.objectives == ["helpful", "harmless"]
    assert tuple(source.score(BATCH).shape) == (4, 2)
    renamed = build("reward", "learned_rm", context(tmp_path), path=str(path), labels=["a", "b"])
    assert renamed.objectives == ["a", "b"]
    with pytest.raises(ModelLoadError, match="has 2 output label\\(s\\) \\(helpful, harmless\\) but 3 objective name\\(s\\)"):
        build("reward", "learned_rm", context(tmp_path), path=str(path), labels=["a", "b", "c"])


def test_learned_rm_refuses_missing_and_non_classifier_directories(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        build("reward", "learned_rm", context(tmp_path), path="nowhere")
    with pytest.raises(ModelLoadError, match="is not a sequence classifier \\(architectures: LlamaForCausalLM\\)"):
        build("reward", "learned_rm", context(tmp_path), path=str(tiny_model_dir))


def test_running_normalisation(tmp_path):
    path = tiny_classifier(tmp_path)
    raw = build("reward", "learned_rm", context(tmp_path), path=str(path)).score(BATCH)
    source = build("reward", "learned_rm", context(tmp_path), path=str(path), normalize=True)
    first = source.score(BATCH)
    values = torch.tensor(raw, dtype=torch.float64)
    assert first == pytest.approx(((values - values.mean()) / values.std()).tolist(), abs=1e-6)
    second = source.score(BATCH)  # same scores again: 8 observations, same mean, smaller sample std
    doubled = torch.cat([values, values])
    assert second == pytest.approx(((values - doubled.mean()) / doubled.std()).tolist(), abs=1e-6)


def test_trainer_accepts_a_reward_model_directory_or_object(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from zenalign import GRPOTrainer

    path = tiny_classifier(tmp_path)
    for reward_model in (str(path), AutoModelForSequenceClassification.from_pretrained(path)):
        trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=reward_model, steps=1, group_size=2,
                              prompts_per_step=2, max_new_tokens=3, progress_bar=False, overwrite=True,
                              output_dir=str(tmp_path / "run"))
        trainer.train(["reverse abc:", "reverse kite:"])
        assert type(trainer.scorer.rewards[0].source).__name__ == "LearnedRM"


# ---------------------------------------------------------------------------------------- preferences

def test_preference_file_errors_give_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:3: missing field\(s\) rejected; each line needs prompt, chosen, rejected"):
        read_preferences(path)
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}\n')
    with pytest.raises(DataError, match="pairs.jsonl:1: margin must be a number"):
        read_preferences(path)
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5}\n')
    assert read_preferences(path)[0].margin == 0.5


def test_bradley_terry_loss_by_hand():
    from zenalign.models.reward_model import bradley_terry_loss

    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # -mean(log sigmoid(1 - 0.5), log sigmoid(0 - 0))
    expected = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(0.5)) / 2
    assert bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 0.0])).item() == pytest.approx(expected)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    """`zenalign train-rm` on the shipped reverse-task pairs (about 2 minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("rm") / "rm-reverse"
    done = run_cli("train-rm", str(RECIPES / "train-rm" / "reverse.yaml"), f"output_dir={out}")
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.mark.slow
def test_trained_rm_reaches_90_percent_on_held_out_pairs(trained_rm):
    out, done = trained_rm
    report = json.loads((out / "eval.json").read_text())
    assert report["eval_pairs"] == 500 and report["eval_accuracy"] >= 0.90, report
    assert f"-> {report['eval_accuracy']:.3f}" in done.stdout
    assert (out / "zenalign_rm.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_grpo_driven_only_by_the_rm_raises_the_verifier_score(trained_rm, tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", str(RECIPES / "reverse-with-rm.yaml"), f"rewards.0.path={trained_rm[0]}", "run.steps=40",
                   "run.eval_interval=0", f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0]["eval/reward_mean/accuracy"], evals[-1]["eval/reward_mean/accuracy"]
    assert after >= before + 0.2, (before, after)


def fresh_accuracy(run: Path) -> list[tuple[float, float]]:
    """(fresh pairwise accuracy, pair count) at each refresh of the run's learned_rm."""
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(m["rm/fresh_accuracy"], m["rm/refresh_pairs"]) for m in metrics if "rm/fresh_accuracy" in m]


def pooled(points: list[tuple[float, float]]) -> float:
    return sum(a * n for a, n in points) / sum(n for _, n in points)


def standard_error_of_difference(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> float:
    """Of the difference between two pooled accuracies, each a proportion over its pairs."""
    variance = 0.0
    for points in (first, second):
        p, n = pooled(points), sum(n for _, n in points)
        variance += p * (1 - p) / n
    return variance ** 0.5


@pytest.mark.slow
def test_online_refresh_keeps_rm_accuracy_on_fresh_samples(trained_rm, tmp_path):
    """The same run twice: the RM frozen and only measured (update: false), and refreshed every 5
    steps. Accuracy is measured on each refresh's new pairs before training on them."""
    runs = {}
    for update in ("false", "true"):
        out = runs[update] = tmp_path / f"update-{update}"
        done = run_cli("run", str(RECIPES / "reverse-with-rm.yaml"), f"rewards.0.path={trained_rm[0]}", "run.steps=40",
                       "run.eval_interval=0", "run.checkpoint_interval=20", f"run.output_dir={out}",
                       f"rewards.0.online={{interval: 5, reference_objective: accuracy, epochs: 1, update: {update}}}")
        assert done.returncode == 0, done.stderr
    frozen, refreshed = fresh_accuracy(runs["false"]), fresh_accuracy(runs["true"])
    assert len(frozen) == len(refreshed) == 8  # every 5 steps
    # Refreshed: no fall from the first half of the run to the second (pooled over pairs) beyond
    # two standard errors (about 0.09 with ~100 pairs a half; a run whose refreshes broke the RM
    # falls to chance, 0.5). A fixed 0.05 sat one standard error from the observed fall.
    allowed = 2 * standard_error_of_difference(refreshed[:4], refreshed[4:])
    assert pooled(refreshed[4:]) >= pooled(refreshed[:4]) - allowed, (refreshed, allowed)
    # ... and, on the late policy's samples, no less accurate than the same RM left frozen beyond two
    # standard errors. Both sit near the ceiling here (0.95-0.975 over ~80 pairs each), where "more
    # accurate" is one or two pairs either way and flipped with a package update; a refresh that
    # broke the RM falls to chance (0.5), far outside.
    allowed = 2 * standard_error_of_difference(frozen[4:], refreshed[4:])
    assert pooled(refreshed[4:]) >= pooled(frozen[4:]) - allowed, (refreshed, frozen, allowed)
    metrics = [json.loads(line) for line in (runs["true"] / "metrics.jsonl").read_text().splitlines()]
    refreshes = [m for m in metrics if "rm/replay_pairs" in m]
    assert refreshes[0]["rm/replay_pairs"] == 0  # nothing to replay yet
    assert all(m["rm/replay_pairs"] == round(0.1 * m["rm/refresh_pairs"]) for m in refreshes[1:])
    state = runs["true"] / "checkpoints" / "step-00000040" / "plugins" / "rewards-0"
    assert (state / "model" / "model.safetensors").is_file() and len((state / "buffer.jsonl").read_text().splitlines()) == sum(
        n for _, n in refreshed)


# ---------------------------------------------------------------------------------------- constitution

def tiny_judge(tmp_path: Path) -> Path:
    from helpers import build_tiny_llama

    path = tmp_path / "judge"
    build_tiny_llama(seed=5).save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


def test_constitution_scores_are_the_judges_yes_probabilities(tmp_path):
    from transformers import AutoModelForCausalLM

    judge = tiny_judge(tmp_path)
    principles = [{"name": "kind", "text": "be kind"}, {"name": "brief", "text": "be brief"}]
    source = build("reward", "constitution", context(tmp_path), judge=str(judge), yes="y", no="n", principles=principles,
                   template="{prompt}{completion}|{principle}?", batch_size=3)
    assert source.objectives == ["kind", "brief"]
    got = source.score(BATCH)  # (4 completions, 2 principles) from batched, left-padded passes
    model = AutoModelForCausalLM.from_pretrained(judge).eval()
    tokenizer = byte_tokenizer()
    yes, no = tokenizer("y", add_special_tokens=False)["input_ids"][0], tokenizer("n", add_special_tokens=False)["input_ids"][0]
    for i, (prompt, completion) in enumerate(zip(BATCH.prompts, BATCH.completions)):
        for k, principle in enumerate(["be kind", "be brief"]):
            ids = tokenizer(f"{prompt}{completion}|{principle}?", add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                logits = model(**ids).logits[0, -1]
            p_yes, p_no = torch.softmax(logits, -1)[yes], torch.softmax(logits, -1)[no]
            assert got[i, k].item() == pytest.approx(float(p_yes / (p_yes + p_no)), abs=1e-5)


def test_constitution_input_errors(tmp_path):
    judge = tiny_judge(tmp_path)
    with pytest.raises(RecipeError, match="constitution.yes: 'yes' is 3 tokens in the judge's tokenizer"):
        build("reward", "constitution", context(tmp_path), judge=str(judge), yes="yes", no="n", principles=["be kind"])
    with pytest.raises(RecipeError, match="constitution.principles: the list is empty"):
        build("reward", "constitution", context(tmp_path), judge=str(judge), yes="y", no="n")
    (tmp_path / "principles.txt").write_text("be kind\nbe brief\n")
    source = build("reward", "constitution", context(tmp_path), judge=str(judge), yes="y", no="n",
                   principles_file="principles.txt")
    assert source.objectives == ["principle_1", "principle_2"]


@pytest.mark.slow
def test_constitutional_grpo_improves_the_verifier(tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", str(RECIPES / "hhh-constitution.yaml"), "run.eval_interval=0",
                   f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    gains = {o: evals[-1][f"eval/reward_mean/{o}"] - evals[0][f"eval/reward_mean/{o}"] for o in ("harmless", "honest")}
    assert gains["harmless"] >= 0.3 and gains["honest"] >= 0.05, gains


def test_critique_revise_writes_sft_and_preference_pairs(tmp_path, tiny_model_dir):
    recipe = tmp_path / "cai.yaml"
    recipe.write_text(f"""
model: {{path: {tiny_model_dir}}}
data: {{type: inline, prompts: ["reverse abc:", "reverse kite:", "reverse moon:"]}}
principles: ["be kind", {{name: brief, text: "be brief"}}]
num_prompts: 3
sampling: {{max_new_tokens: 6}}
output_dir: {tmp_path / "out"}
""")
    done = run_cli("critique-revise", str(recipe), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == 3 and {"prompt", "completion", "original", "critique", "principle"} <= set(sft[0])
    assert {s["principle"] for s in sft} <= {"principle_1", "brief"}
    prefs = (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()
    assert len(prefs) == sum(s["completion"].strip() != s["original"].strip() for s in sft)
    if prefs:  # the pairs feed straight into train-rm
        read_preferences(tmp_path / "out" / "preferences.jsonl")


def one_error_line(done) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("zenalign: error:"), done.stderr
    return lines[0]


def test_cli_label_count_mismatch(tmp_path, tiny_model_dir):
    rm = tiny_classifier(tmp_path, num_labels=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{path: {tiny_model_dir}}}
data: {{type: inline, prompts: ["a"]}}
rewards: [{{type: learned_rm, path: {rm}, labels: [helpful]}}]
""")
    message = one_error_line(cli_in_process("validate", str(recipe), cwd=tmp_path))
    assert "rewards[0] (learned_rm)" in message and "has 2 output label(s)" in message and "1 objective name(s)" in message


def test_cli_train_rm_preference_file_missing_field(tmp_path, tiny_model_dir):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "rejected": "b"}\n')
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{path: pairs.jsonl, eval_size: 0}}\noutput_dir: {tmp_path / 'rm'}\n")
    message = one_error_line(cli_in_process("train-rm", str(recipe), cwd=tmp_path))
    assert "pairs.jsonl:2: missing field(s) chosen" in message
    assert not (tmp_path / "rm").exists()
    recipe.write_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{path: pairs.jsonl}}\ntrain: {{epoch: 2}}\n")
    assert "train.epoch: unknown field; accepted here: epochs" in one_error_line(cli_in_process("train-rm", str(recipe), cwd=tmp_path))
