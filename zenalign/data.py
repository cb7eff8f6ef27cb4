"""Prompt records: checking them, drawing them in a seeded order, and rendering them to text.

A record is a dict with a ``prompt`` string (or chat ``messages``) and any other fields, which
reward sources receive by name. The order is a seeded permutation per epoch; the sampler's
position (epoch, index) is all that is needed to continue exactly where a run stopped.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from zenalign.errors import DataError

log = logging.getLogger("zenalign")


def not_utf8(path: Path, line_no: int, exc: UnicodeDecodeError, error: type[Exception] = DataError) -> Exception:
    """The one-line error for a file that is not UTF-8 text, naming the file, the line and the byte."""
    byte = exc.object[exc.start:exc.start + 1].hex()
    return error(f"{path}:{line_no}: not valid UTF-8 (byte 0x{byte} at byte {exc.start + 1} of the line); "
                 f"save the file as UTF-8")


def read_utf8(path: Path, error: type[Exception] = DataError) -> str:
    """A whole text file as UTF-8 (a byte-order mark at its start is dropped); bytes that are not
    UTF-8 are an ``error`` naming the file and the line."""
    data = path.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # by hand: utf-8-sig's error offsets skip it
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = UnicodeDecodeError(exc.encoding, data[line_start:exc.end], exc.start - line_start,
                                  exc.end - line_start, exc.reason)
        raise not_utf8(path, data.count(b"\n", 0, exc.start) + 1, line, error) from None


def jsonl_objects(path: Path, missing: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; a missing file, a line that
    is not UTF-8 or not JSON, or one that is not an object is a DataError naming the file and line.
    A byte-order mark before the first line is accepted. ``missing``: the error message when the
    file does not exist."""
    if not path.is_file():
        raise DataError(missing)
    with path.open("rb") as f:  # bytes, decoded line by line: an encoding error can then name its line
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise not_utf8(path, line_no, exc) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def is_blank(record: dict[str, Any]) -> bool:
    """A prompt without text: ``""`` or whitespace, or chat messages whose every text content is."""
    if isinstance(record.get("prompt"), str):
        return not record["prompt"].strip()
    messages = prompt_messages(record)
    return all(isinstance(m.get("content"), str) and not m["content"].strip() for m in messages)


def check_records(records: Iterable[Any], where: str) -> list[dict[str, Any]]:
    """Turn strings into ``{"prompt": s}``, check every record has a prompt, and leave out the
    prompts without text (:func:`is_blank`), with a warning that counts them; if every prompt is
    blank, a DataError naming ``where``. An empty prompt has no token for the first completion
    token to attend to: the lean forward and transformers' disagree on it (next-token log-probs
    14 apart), and a batch of only empty prompts has no prompt columns at all."""
    out = _checked(records, where)
    kept = [record for record in out if not is_blank(record)]
    if out and not kept:
        raise DataError(f"{where}: all {len(out)} prompts are empty or whitespace only; give prompts with text")
    if len(kept) < len(out):
        log.warning("%s: %d of %d prompts are empty or whitespace only; they are left out (the policy would have "
                    "nothing to continue from)", where, len(out) - len(kept), len(out))
    return kept


def _checked(records: Iterable[Any], where: str) -> list[dict[str, Any]]:
    out = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict):
            raise DataError(f"{where}[{i}]: expected a prompt string or a record with a 'prompt' field, got {type(record).__name__}")
        if not isinstance(record.get("prompt"), str):
            field = "prompt" if isinstance(record.get("prompt"), list) else "messages" if "messages" in record else None
            if field is None:
                raise DataError(f"{where}[{i}]: record has no 'prompt' (text, or a list of chat messages) and no "
                                f"'messages' (fields: {', '.join(record) or 'none'})")
            messages = record[field]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
                raise DataError(f"{where}[{i}]: '{field}' must be a list of {{role, content}} objects")
        out.append(record)
    return out


def hold_out(records: list[dict[str, Any]], size: int, seed: int, field: str = "data.eval_size"
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``size`` records off for evaluation with a fixed seed: (train, eval)."""
    if size >= len(records):
        raise DataError(f"{field}: {size} would leave no training prompts ({len(records)} records)")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


class HeldPrompts:
    """A prompt source that has read its records: ``self.train`` and ``self.eval`` (lists)."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]

    def train_prompts(self) -> list[dict[str, Any]]:
        return self.train

    def eval_prompts(self) -> list[dict[str, Any]]:
        return self.eval


def is_conversational(record: dict[str, Any]) -> bool:
    """TRL's conversational format: ``prompt`` is a list of chat messages (reward functions then
    get completions as messages too). zenalign's own ``messages`` field is rendered the same way,
    but its rewards get plain text."""
    return isinstance(record.get("prompt"), list)


def prompt_messages(record: dict[str, Any]) -> Any:
    """The chat messages of a record (``prompt`` as a list, or ``messages``), or None for text."""
    return record["prompt"] if is_conversational(record) else record.get("messages") if "prompt" not in record else None


def render_prompt(record: dict[str, Any], tokenizer: Any) -> str:
    """The text the policy is conditioned on: a ``prompt`` string as is, or the chat messages
    (``prompt`` as a list, TRL's conversational format, or ``messages``) through the tokenizer's
    chat template with the generation prompt appended."""
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    if getattr(tokenizer, "chat_template", None) is None:
        field = "prompt" if is_conversational(record) else "messages"
        raise DataError(f"a prompt record's '{field}' holds chat messages but the tokenizer has no chat template; "
                        f"give a tokenizer with one, or 'prompt' text")
    return tokenizer.apply_chat_template(prompt_messages(record), tokenize=False, add_generation_prompt=True)


def metadata_columns(records: list[dict[str, Any]], repeat: int) -> dict[str, list[Any]]:
    """Every field but the prompt, repeated once per completion: ``{"answer": [a0, a0, ..., a1, ...]}``."""
    keys: list[str] = []
    for record in records:
        keys.extend(k for k in record if k not in ("prompt", "messages") and k not in keys)
    return {k: [r.get(k) for r in records for _ in range(repeat)] for k in keys}


@dataclass
class SamplerState:
    epoch: int = 0
    index: int = 0


class PromptSampler:
    """Draws prompts without replacement in a seeded order, reshuffling every epoch."""

    def __init__(self, records: list[dict[str, Any]], seed: int, state: SamplerState | None = None):
        if not records:
            raise DataError("data: the prompt source produced no training prompts")
        self.records = records
        self.seed = seed
        self.state = state or SamplerState()
        self._order = self._permutation(self.state.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def reorder(self) -> None:
        """Recompute the order for the current epoch (after restoring ``state``)."""
        self._order = self._permutation(self.state.epoch)

    def next_batch(self, count: int) -> list[dict[str, Any]]:
        batch = []
        while len(batch) < count:
            if self.state.index >= len(self._order):
                self.state.epoch, self.state.index = self.state.epoch + 1, 0  # in place: a TrainState shares it
                self._order = self._permutation(self.state.epoch)
            batch.append(self.records[self._order[self.state.index]])
            self.state.index += 1
        return batch
