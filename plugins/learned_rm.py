"""A learned reward model: any local AutoModelForSequenceClassification directory.

    rewards:
      - type: learned_rm
        name: rm
        path: ../runs/rm-reverse        # from `zenalign train-rm`, or a local copy of a Hub RM
        labels: [helpful, harmless]     # for a multi-label RM: one objective per label

With one label the RM is one objective; with several, each label is an objective (named by
``labels`` or the config's id2label). The RM reads (prompt, completion) in its own format, with
its own tokenizer and chat template, scored in batches under no-grad with truncation to
``max_length``. ``normalize: true`` standardises scores with running statistics over everything
scored so far.

``online`` refreshes the RM during GRPO: every ``interval`` steps it is trained (Bradley-Terry) on
pairs built from the policy's own groups, the best and the worst completion by a reference
objective, mixed with a replay share of earlier pairs (10% by default, as in DeepSeekMath's
iterative RL). Its accuracy on the fresh pairs, measured before each refresh, is logged as
``<name>/fresh_accuracy`` (name: the reward entry's); ``update: false`` only measures it, to watch a
frozen RM for reward hacking. Weights, pairs and statistics are saved with checkpoints.
"""

import json
import random
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field

from zenalign import Options, RewardSourceType, hookimpl
from zenalign.errors import RecipeError
from zenalign.models.reward_model import Pair, RMFormat, load_reward_model, pairwise_accuracy, read_preferences, score_texts, train_bradley_terry, write_preferences, label_names


class OnlineOptions(Options):
    interval: int = Field(ge=1, description="Refresh the reward model every this many steps.")
    reference_objective: str = Field(description="Objective (a verifier or a judge) that picks the best and worst completion.")
    replay_fraction: float = Field(0.1, ge=0, le=1, description="Share of earlier pairs mixed into each refresh.")
    epochs: float = Field(1.0, gt=0, description="Passes over each refresh's pairs.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate of the refresh.")
    batch_size: int = Field(32, ge=1, description="Pairs per optimizer step.")
    buffer_size: int = Field(20000, ge=1, description="Earlier pairs kept for replay (oldest dropped first).")
    initial_pairs: Optional[str] = Field(None, description="Preference JSONL to seed the replay buffer with.")
    reset_reference: bool = Field(False, description="Reset the KL reference policy to the current policy at each refresh.")
    update: bool = Field(True, description="Train the RM at each refresh; false only measures fresh_accuracy "
                                            "(a frozen RM watched for reward hacking).")


class LearnedRMOptions(Options):
    path: str = Field(description="Local AutoModelForSequenceClassification directory (relative to the recipe).")
    labels: Optional[list[str]] = Field(None, description="Objective names, one per output label (multi-label RMs).")
    batch_size: int = Field(32, ge=1, description="Completions per forward pass.")
    max_length: Optional[int] = Field(None, ge=8, description="Truncate inputs to this many tokens (default: as trained, else 512).")
    template: Optional[str] = Field(None, description="Input made from {prompt} and {completion} (default: as trained).")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="Use the RM tokenizer's chat template: auto = as trained, else when the tokenizer has one."
    )
    normalize: bool = Field(False, description="Standardise scores with running mean and std per label.")
    trust_remote_code: bool = Field(False, description="Allow model code shipped in the directory to run.")
    online: Optional[OnlineOptions] = Field(None, description="Refresh the RM during GRPO from the policy's own groups.")


class RunningStats:
    """Mean and variance per label over every score seen (Chan et al.'s parallel update)."""

    def __init__(self, labels: int):
        self.count = 0
        self.mean = torch.zeros(labels, dtype=torch.float64)
        self.m2 = torch.zeros(labels, dtype=torch.float64)

    def update(self, scores: torch.Tensor) -> None:
        n = scores.shape[0]
        if n == 0:
            return
        batch_mean = scores.double().mean(0)
        batch_m2 = ((scores.double() - batch_mean) ** 2).sum(0)
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def standardize(self, scores: torch.Tensor) -> torch.Tensor:
        std = (self.m2 / max(self.count - 1, 1)).sqrt().clamp(min=1e-6)
        return (scores.double() - self.mean) / std


class LearnedRM:
    """Scores from a sequence-classification reward model."""

    def __init__(self, options: LearnedRMOptions, context=None, model=None, tokenizer=None, directory: Optional[Path] = None):
        self.options = options
        if model is None:
            directory = context.resolve_path(options.path) if context is not None else Path(options.path)
            model, tokenizer = load_reward_model(directory, "learned_rm.path", options.trust_remote_code, options.labels)
        self.model, self.tokenizer = model, tokenizer
        if context is not None and context.device is not None:
            self.model.to(context.device)
        chat = {"auto": None, "on": True, "off": False}[options.chat_template]
        self.format = RMFormat.for_model(directory or Path("."), tokenizer, options.template, chat, options.max_length)
        labels = options.labels or label_names(model.config)
        if len(labels) > 1:
            self.objectives = list(labels)
        self.stats = RunningStats(model.config.num_labels) if options.normalize else None
        self.buffer: list[Pair] = []
        self.pending: list[Pair] = []
        self.last_metrics: dict[str, float] = {}
        online = options.online
        if online is not None and online.initial_pairs:
            seed_file = context.resolve_path(online.initial_pairs) if context is not None else Path(online.initial_pairs)
            self.buffer = read_preferences(seed_file)[-online.buffer_size:]

    def score(self, batch):
        texts = [self.format.render(self.tokenizer, p, c) for p, c in zip(batch.prompts, batch.completions)]
        scores = score_texts(self.model, self.tokenizer, texts, self.options.batch_size, self.format.max_length,
                             special_tokens=not self.format.chat_template).double()
        if self.stats is not None:
            self.stats.update(scores)
            scores = self.stats.standardize(scores)
        return scores[:, 0].tolist() if scores.shape[1] == 1 else scores

    # -- online refresh ------------------------------------------------------------------------

    def on_scored(self, batch, rewards, objectives, context) -> None:
        """After each training step's scoring: collect best/worst pairs; refresh every interval."""
        online = self.options.online
        if online is None:
            return
        if online.reference_objective not in objectives.names:
            raise RecipeError(
                f"learned_rm.online.reference_objective: no objective '{online.reference_objective}'; "
                f"objectives: {', '.join(objectives.names)}"
            )
        column = rewards[:, objectives.names.index(online.reference_objective)]
        group = batch.group_size
        for start in range(0, len(batch), group):
            scores = column[start : start + group]
            valid = ~torch.isnan(scores)
            if valid.sum() < 2:
                continue
            masked_hi = torch.where(valid, scores, torch.full_like(scores, -float("inf")))
            masked_lo = torch.where(valid, scores, torch.full_like(scores, float("inf")))
            best, worst = int(masked_hi.argmax()), int(masked_lo.argmin())
            if scores[best] > scores[worst]:
                self.pending.append(Pair(batch.prompts[start], batch.completions[start + best], batch.completions[start + worst]))
        self.last_metrics = {}
        if context.step % online.interval == 0:
            self._refresh(context)

    def _refresh(self, context) -> None:
        online = self.options.online
        fresh = context.gather_objects(self.pending)  # every rank trains on the same pairs
        self.pending = []
        if not fresh:
            return
        accuracy = pairwise_accuracy(self.model, self.tokenizer, self.format, fresh, self.options.batch_size)
        if not online.update:
            self.last_metrics = {"fresh_accuracy": accuracy, "refresh_pairs": float(len(fresh))}
            return
        rng = random.Random(context.seed * 7_919 + context.step)
        replay = rng.sample(self.buffer, min(len(self.buffer), round(online.replay_fraction * len(fresh))))
        losses = train_bradley_terry(self.model, self.tokenizer, self.format, fresh + replay, epochs=online.epochs,
                                     learning_rate=online.learning_rate, batch_size=online.batch_size,
                                     seed=context.seed + context.step)
        self.buffer = (self.buffer + fresh)[-online.buffer_size:]
        self.last_metrics = {
            "fresh_accuracy": accuracy,
            "refresh_pairs": float(len(fresh)),
            "replay_pairs": float(len(replay)),
            "refresh_loss": sum(losses) / len(losses),
        }
        if online.reset_reference:
            context.reset_reference_to_policy()

    def metrics(self) -> dict[str, float]:
        return dict(self.last_metrics)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_state(self, directory: Path) -> None:
        self.model.save_pretrained(directory / "model", safe_serialization=True)
        write_preferences(directory / "buffer.jsonl", self.buffer) if self.buffer else None
        write_preferences(directory / "pending.jsonl", self.pending) if self.pending else None
        state = {}
        if self.stats is not None:
            state = {"count": self.stats.count, "mean": self.stats.mean.tolist(), "m2": self.stats.m2.tolist()}
        (directory / "state.json").write_text(json.dumps(state), encoding="utf-8")

    def load_state(self, directory: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(directory / "model" / "model.safetensors"))
        self.model.load_state_dict(weights, strict=False)
        self.buffer = read_preferences(directory / "buffer.jsonl") if (directory / "buffer.jsonl").is_file() else []
        self.pending = read_preferences(directory / "pending.jsonl") if (directory / "pending.jsonl").is_file() else []
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        if self.stats is not None and state:
            self.stats.count = state["count"]
            self.stats.mean = torch.tensor(state["mean"], dtype=torch.float64)
            self.stats.m2 = torch.tensor(state["m2"], dtype=torch.float64)


def build(options: LearnedRMOptions, context):
    """A learned reward model (sequence classifier) as a reward source."""
    source = LearnedRM(options, context)
    return source


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("learned_rm", LearnedRMOptions, build)]


@hookimpl
def zenalign_reward_from_object(obj, context):
    """GRPOTrainer(reward_model=...) handed a sequence classifier, or the path of one."""
    from transformers import PreTrainedModel

    if isinstance(obj, PreTrainedModel) and type(obj).__name__.endswith("ForSequenceClassification"):
        from zenalign.models.loading import load_tokenizer
        from zenalign.models.reward_model import prepare_for_scoring

        source = getattr(obj, "name_or_path", None)
        if not source or not Path(source).is_dir():
            raise RecipeError("reward_model: a reward model object needs its tokenizer; pass the model's directory instead")
        tokenizer = load_tokenizer(Path(source), "reward_model")
        prepare_for_scoring(obj, tokenizer)
        obj.eval()
        directory = Path(obj.name_or_path) if getattr(obj, "name_or_path", None) else None
        return LearnedRM(LearnedRMOptions(path=str(directory or ".")), context, model=obj, tokenizer=tokenizer, directory=directory)
    if isinstance(obj, (str, Path)) and (Path(obj) / "config.json").is_file():
        return LearnedRM(LearnedRMOptions(path=str(obj)), context)
    return None
