"""Prompt sources that read prompts you already have.

- ``jsonl``: one JSON object per line with a ``prompt`` string (or chat ``messages``) and any other
  fields, which reward sources receive by name (for example ``answer``).
- ``inline``: prompts written in the recipe itself, handy for small experiments.

Held-out evaluation prompts come from ``eval_path``/``eval_prompts``, or from ``eval_size``
records split off the training set with a fixed seed.
"""

from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field

from zenalign import hookimpl
from zenalign.data import HeldPrompts, hold_out, jsonl_objects
from zenalign.errors import DataError
from zenalign.plugins import Options, TaskType


class JsonlOptions(Options):
    path: str = Field(description="JSONL file of prompt records (relative to the recipe).")
    eval_path: Optional[str] = Field(None, description="JSONL file of held-out evaluation records.")
    eval_size: int = Field(0, ge=0, description="Without eval_path: hold out this many training records for evaluation.")
    prompt_field: str = Field("prompt", description="Field holding the prompt text.")
    split_seed: int = Field(0, description="Seed of the train/eval split when eval_size is used.")


class InlineOptions(Options):
    prompts: list[Union[str, dict[str, Any]]] = Field(
        min_length=1, description="Prompt strings or records ({prompt: ..., answer: ...}); at least one."
    )
    eval_prompts: list[Union[str, dict[str, Any]]] = Field(default_factory=list, description="Held-out prompts.")


def read_jsonl(path: Path, prompt_field: str) -> list[dict[str, Any]]:
    records = []
    for line_no, record in jsonl_objects(path, f"data.path: prompt file '{path}' does not exist"):
        if prompt_field != "prompt" and prompt_field in record:
            record["prompt"] = record.pop(prompt_field)
        if "prompt" not in record and "messages" not in record:
            raise DataError(f"{path}:{line_no}: record has no '{prompt_field}' field (or chat 'messages')")
        records.append(record)
    return records


class JsonlTask(HeldPrompts):
    """Prompts from a JSONL file."""

    def __init__(self, options: JsonlOptions, context):
        self.train = read_jsonl(context.resolve_path(options.path), options.prompt_field)
        if options.eval_path:
            self.eval = read_jsonl(context.resolve_path(options.eval_path), options.prompt_field)
        elif options.eval_size:
            self.train, self.eval = hold_out(self.train, options.eval_size, options.split_seed)
        else:
            self.eval = []


class InlineTask:
    """Prompts written in the recipe."""

    def __init__(self, options: InlineOptions):
        self.options = options

    def train_prompts(self):
        return list(self.options.prompts)

    def eval_prompts(self):
        return list(self.options.eval_prompts)


@hookimpl
def zenalign_task_types():
    return [TaskType("jsonl", JsonlOptions, JsonlTask), TaskType("inline", InlineOptions, InlineTask)]
