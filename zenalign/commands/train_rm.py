"""``zenalign train-rm RECIPE``: a Bradley-Terry reward model from preference pairs.

    model:  {path: models/reverse-policy}        # backbone: a causal LM (new score head) or a classifier
    data:   {path: data/pairs.jsonl, eval_path: data/pairs-eval.jsonl}
    train:  {epochs: 3, learning_rate: 3e-4, batch_size: 32}
    output_dir: runs/rm-reverse

The output directory is a plain ``AutoModelForSequenceClassification`` directory (safetensors,
tokenizer, and ``zenalign_rm.json`` with the input format) that the ``learned_rm`` reward source
loads, plus ``metrics.jsonl`` (loss per step) and ``eval.json`` (held-out pairwise accuracy).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
from pydantic import Field, ValidationError

from zenalign.errors import RecipeError
from zenalign.recipe.schema import Section
from zenalign.recipe.loader import apply_override, read_yaml
from zenalign.recipe.messages import format_validation_error
from zenalign.models.reward_model import DEFAULT_TEMPLATE, RMFormat, pairwise_accuracy, read_preferences, reward_head_from_backbone, train_bradley_terry

log = logging.getLogger("zenalign")


class RMModelSection(Section):
    path: str = Field(description="Backbone directory: a causal LM (a score head is added) or a sequence classifier.")
    trust_remote_code: bool = Field(False, description="Allow model code shipped in the directory to run.")


class RMDataSection(Section):
    path: str = Field(description="JSONL of preference pairs {prompt, chosen, rejected, margin?} (relative to the recipe).")
    eval_path: Optional[str] = Field(None, description="JSONL of held-out pairs for pairwise accuracy.")
    eval_size: int = Field(0, ge=0, description="Without eval_path: hold out this many training pairs.")


class RMTrainSection(Section):
    epochs: float = Field(2.0, gt=0, description="Passes over the training pairs.")
    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(32, ge=1, description="Pairs per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(512, ge=8, description="Longest input in tokens; longer inputs lose their beginning.")
    template: str = Field(DEFAULT_TEMPLATE, description="Input text made from {prompt} and {completion} (no chat template).")
    chat_template: bool = Field(False, description="Render (prompt, completion) with the tokenizer's chat template instead.")
    seed: int = Field(0, description="Seed of the pair order and initialisation.")


class RMRecipe(Section):
    """A reward-model training run for `zenalign train-rm`."""

    model: RMModelSection = Field(description="The backbone the reward model starts from.")
    data: RMDataSection = Field(description="Preference pairs.")
    train: RMTrainSection = Field(default_factory=RMTrainSection, description="Optimisation and input format.")
    output_dir: str = Field("runs/{recipe}", description="Where the reward model is saved. `{recipe}` is the file's name.")
    overwrite: bool = Field(False, description="Replace an existing reward model in output_dir.")


def load_rm_recipe(path: Path, overrides=()) -> RMRecipe:
    data = read_yaml(path)
    for text in overrides:
        apply_override(data, text)
    try:
        return RMRecipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, RMRecipe, str(path), overrides)) from exc


def train_rm(path: Path, overrides=()) -> dict:
    recipe = load_rm_recipe(path, overrides)
    base = path.resolve().parent
    resolve = lambda p: Path(p) if Path(p).is_absolute() else base / p
    out = Path(recipe.output_dir.replace("{recipe}", path.stem))
    if out.exists() and any(out.iterdir()) and not recipe.overwrite:
        raise RecipeError(f"{path}: output_dir: '{out}' already exists; choose another or set overwrite=true")
    pairs = read_preferences(resolve(recipe.data.path))
    if recipe.data.eval_path:
        held_out = read_preferences(resolve(recipe.data.eval_path))
    else:
        order = list(range(len(pairs)))
        random.Random(recipe.train.seed).shuffle(order)
        held = set(order[: recipe.data.eval_size])
        held_out = [p for i, p in enumerate(pairs) if i in held]
        pairs = [p for i, p in enumerate(pairs) if i not in held]
    t = recipe.train
    torch.manual_seed(t.seed)
    model, tokenizer = reward_head_from_backbone(resolve(recipe.model.path), "model.path", recipe.model.trust_remote_code)
    fmt = RMFormat(template=t.template, chat_template=t.chat_template, max_length=t.max_length)
    before = pairwise_accuracy(model, tokenizer, fmt, held_out) if held_out else float("nan")
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with (staging / "metrics.jsonl").open("w", encoding="utf-8") as metrics:
        def on_step(step: int, loss: float) -> None:
            metrics.write(json.dumps({"step": step + 1, "loss": loss}) + "\n")
            if (step + 1) % 50 == 0:
                log.info("step %d  loss %.4f", step + 1, loss)

        train_bradley_terry(model, tokenizer, fmt, pairs, epochs=t.epochs, learning_rate=t.learning_rate,
                            batch_size=t.batch_size, seed=t.seed, weight_decay=t.weight_decay, on_step=on_step)
    after = pairwise_accuracy(model, tokenizer, fmt, held_out) if held_out else float("nan")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    fmt.save(staging)
    report = {"train_pairs": len(pairs), "eval_pairs": len(held_out), "eval_accuracy_before": before, "eval_accuracy": after}
    (staging / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    report["output_dir"] = str(out)
    return report
