"""Learned reward models: loading, formatting, batched scoring and Bradley-Terry training.

A reward model is any local ``AutoModelForSequenceClassification`` directory. It reads text in its
own format, with its own tokenizer: a chat template when it has one, else a plain template
(``{prompt}{completion}``). ``zenalign train-rm`` writes the format it was trained with to
``zenalign_rm.json`` beside the weights, so scoring uses the same one.

Bradley-Terry: for a preference pair (chosen, rejected) with optional margin m,
``loss = -log sigmoid(r(chosen) - r(rejected) - m)``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from zenalign.data import jsonl_objects
from zenalign.errors import DataError, ModelLoadError, one_line
from zenalign.models.loading import check_model_dir, load_tokenizer

FORMAT_FILE = "zenalign_rm.json"
DEFAULT_TEMPLATE = "{prompt}{completion}"


@dataclass
class RMFormat:
    """How (prompt, completion) becomes the reward model's input text."""

    template: str = DEFAULT_TEMPLATE
    chat_template: bool = False
    max_length: int = 512

    def render(self, tokenizer: Any, prompt: str, completion: str) -> str:
        if self.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return self.template.format(prompt=prompt, completion=completion)

    @classmethod
    def for_model(cls, path: Path, tokenizer: Any, template: Optional[str] = None, chat_template: Optional[bool] = None,
                  max_length: Optional[int] = None) -> "RMFormat":
        """The saved format of a zenalign-trained RM, else the chat template if the tokenizer has
        one, else the plain template; explicit arguments win."""
        saved = {}
        if (path / FORMAT_FILE).is_file():
            saved = json.loads((path / FORMAT_FILE).read_text(encoding="utf-8"))
        has_chat = getattr(tokenizer, "chat_template", None) is not None
        return cls(
            template=template or saved.get("template", DEFAULT_TEMPLATE),
            chat_template=chat_template if chat_template is not None else saved.get("chat_template", has_chat and not saved),
            max_length=max_length or saved.get("max_length", 512),
        )

    def save(self, path: Path) -> None:
        (path / FORMAT_FILE).write_text(json.dumps(self.__dict__, indent=1), encoding="utf-8")


def load_reward_model(path: Path, field: str, trust_remote_code: bool = False, labels: Optional[Sequence[str]] = None):
    """A sequence classifier and its tokenizer from a local directory, or a one-line error.

    A causal LM directory is refused: AutoModelForSequenceClassification would load it with a
    freshly initialised (random) score head and every reward would be noise."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_model_dir(path, field)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelLoadError(
            f"{field}: '{path}' is not a sequence classifier (architectures: {', '.join(architectures) or 'none'}); "
            f"give a directory saved from AutoModelForSequenceClassification, or train one with `zenalign train-rm`"
        )
    if labels is not None and len(labels) != config.num_labels:
        raise ModelLoadError(
            f"{field}: '{path}' has {config.num_labels} output label(s) ({', '.join(label_names(config))}) but "
            f"{len(labels)} objective name(s) were declared ({', '.join(labels)}); declare one name per label"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=True, local_files_only=True, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(f"{field}: cannot load '{path}' as a reward model: {type(exc).__name__}: {one_line(exc)}") from exc
    tokenizer = load_tokenizer(path, field, trust_remote_code)
    prepare_for_scoring(model, tokenizer)
    model.eval()
    return model, tokenizer


def label_names(config: Any) -> list[str]:
    return [config.id2label[i] for i in range(config.num_labels)]


def prepare_for_scoring(model: Any, tokenizer: Any) -> None:
    """The classifier pools the last non-pad token, so it must know the pad id; keep the end of
    long inputs (the completion) rather than the start when truncating."""
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = "left"


def reward_head_from_backbone(path: Path, field: str, trust_remote_code: bool = False):
    """A 1-label sequence classifier initialised from any local causal LM or classifier directory
    (the usual start of an RM: an SFT policy with a new score head)."""
    from transformers import AutoModelForSequenceClassification

    check_model_dir(path, field)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=True, local_files_only=True,
            dtype=torch.float32, ignore_mismatched_sizes=True,
        )
    except Exception as exc:
        raise ModelLoadError(f"{field}: cannot build a reward model from '{path}': {type(exc).__name__}: {one_line(exc)}") from exc
    tokenizer = load_tokenizer(path, field, trust_remote_code)
    prepare_for_scoring(model, tokenizer)
    return model, tokenizer


def forward_scores(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, special_tokens: bool = True) -> torch.Tensor:
    """One forward pass: ``(len(texts), num_labels)`` float32 scores (with gradient if enabled).
    ``special_tokens``: add the tokenizer's BOS/EOS (plain templates); a chat template has its own."""
    device = next(model.parameters()).device
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                        add_special_tokens=special_tokens).to(device)
    return model(**encoded).logits.float()


@torch.no_grad()
def score_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int,
                special_tokens: bool = True) -> torch.Tensor:
    """Scores for many texts, in batches, without gradients: ``(N, num_labels)``."""
    was_training = model.training
    model.eval()
    parts = [forward_scores(model, tokenizer, texts[i : i + batch_size], max_length, special_tokens)
             for i in range(0, len(texts), batch_size)]
    model.train(was_training)
    return torch.cat(parts).cpu() if parts else torch.zeros(0, model.config.num_labels)


# ------------------------------------------------------------------------------------------------
# preference pairs


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


def read_preferences(path: Path) -> list[Pair]:
    """JSONL of ``{prompt, chosen, rejected, margin?}``; errors give the line number."""
    pairs = []
    for line_no, record in jsonl_objects(path, f"preference file '{path}' does not exist"):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(record.get(k), str)]
        if missing:
            raise DataError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}; each line needs prompt, chosen, rejected (strings) and optionally margin")
        margin = record.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise DataError(f"{path}:{line_no}: margin must be a number (got {margin!r})")
        pairs.append(Pair(record["prompt"], record["chosen"], record["rejected"], float(margin)))
    if not pairs:
        raise DataError(f"preference file '{path}' holds no pairs")
    return pairs


def write_preferences(path: Path, pairs: Sequence[Pair]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            record = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            if p.margin:
                record["margin"] = p.margin
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def pair_rewards(model, tokenizer, fmt: RMFormat, pairs: Sequence[Pair], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = [fmt.render(tokenizer, p.prompt, p.chosen) for p in pairs]
    rejected = [fmt.render(tokenizer, p.prompt, p.rejected) for p in pairs]
    special = not fmt.chat_template
    return (score_texts(model, tokenizer, chosen, batch_size, fmt.max_length, special)[:, 0],
            score_texts(model, tokenizer, rejected, batch_size, fmt.max_length, special)[:, 0])


def pairwise_accuracy(model, tokenizer, fmt: RMFormat, pairs: Sequence[Pair], batch_size: int = 64) -> float:
    """Share of pairs whose chosen response scores strictly higher than the rejected one."""
    if not pairs:
        return float("nan")
    chosen, rejected = pair_rewards(model, tokenizer, fmt, pairs, batch_size)
    return float((chosen > rejected).float().mean())


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def train_bradley_terry(
    model, tokenizer, fmt: RMFormat, pairs: Sequence[Pair], *, epochs: float, learning_rate: float, batch_size: int,
    seed: int, weight_decay: float = 0.0, on_step: Optional[Callable[[int, float], None]] = None,
) -> list[float]:
    """AdamW on the Bradley-Terry loss over shuffled mini-batches of pairs; returns the losses."""
    rng = random.Random(seed)
    order: list[int] = []
    total = max(1, round(epochs * len(pairs) / batch_size))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=weight_decay)
    model.train()
    losses = []
    device = next(model.parameters()).device
    for step in range(total):
        if len(order) < batch_size:
            extra = list(range(len(pairs)))
            rng.shuffle(extra)
            order += extra
        batch = [pairs[i] for i in order[:batch_size]]
        del order[:batch_size]
        texts = [fmt.render(tokenizer, p.prompt, p.chosen) for p in batch] + [fmt.render(tokenizer, p.prompt, p.rejected) for p in batch]
        scores = forward_scores(model, tokenizer, texts, fmt.max_length, not fmt.chat_template)[:, 0]
        margin = torch.tensor([p.margin for p in batch], dtype=scores.dtype, device=device)
        loss = bradley_terry_loss(scores[: len(batch)], scores[len(batch):], margin)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
