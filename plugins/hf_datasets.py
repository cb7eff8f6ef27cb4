"""Prompts from Hugging Face ``datasets``, read locally (the ``hf`` prompt source).

``path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a data
file (``.parquet``, ``.json``, ``.jsonl``, ``.csv``, ``.arrow``), or a directory of such files.
Nothing is downloaded: a name that is not a local path is refused, and ``datasets`` runs offline.

Rows become prompt records with every column, which reward sources receive by name. The prompt is
``prompt_field`` (text, or a list of chat messages: TRL's conversational format) or
``messages_field`` (chat messages rendered with the chat template; rewards get plain text).
Needs ``pip install 'zenalign[datasets]'``.
"""

import os
from pathlib import Path
from typing import Any, Optional

from pydantic import Field, model_validator

from zenalign import hookimpl
from zenalign.data import HeldPrompts, hold_out
from zenalign.errors import DataError, one_line
from zenalign.plugins import Options, TaskType

FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


class HFOptions(Options):
    path: str = Field(description="A save_to_disk directory, a data file (parquet, json, jsonl, csv, arrow) or a "
                      "directory of data files; relative to the recipe. Local only: nothing is downloaded.")
    split: str = Field("train", description="Split of a saved DatasetDict (or of a directory of split files) to train on.")
    eval_split: Optional[str] = Field(None, description="Split holding held-out evaluation prompts.")
    eval_path: Optional[str] = Field(None, description="Or: a separate data file / directory of evaluation prompts.")
    eval_size: int = Field(0, ge=0, description="Without eval_split/eval_path: hold out this many training rows.")
    prompt_field: str = Field("prompt", description="Column holding the prompt: text, or a list of {role, content} "
                              "messages (TRL's conversational format).")
    messages_field: Optional[str] = Field(None, description="Or: column holding chat messages, rendered with the "
                                          "tokenizer's chat template (rewards get text).")
    split_seed: int = Field(0, description="Seed of the train/eval split when eval_size is used.")

    @model_validator(mode="after")
    def _one_eval_source(self):
        if sum(x is not None for x in (self.eval_split, self.eval_path)) + bool(self.eval_size) > 1:
            raise ValueError("give at most one of eval_split, eval_path and eval_size")
        return self


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local path only; never the Hub
    try:
        import datasets
    except ImportError:
        raise DataError("data.type hf needs the datasets library: pip install 'zenalign[datasets]'") from None
    return datasets


def load_split(path: Path, split: str, field: str) -> Any:
    """One split of a local dataset, as a ``datasets.Dataset``."""
    datasets = _datasets()
    if not path.exists():
        raise DataError(f"{field}: '{path}' does not exist; give a save_to_disk directory or a local data file "
                        f"({', '.join(FORMATS)}); nothing is downloaded")
    try:
        if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
        else:
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in FORMATS)
            kinds = {FORMATS.get(p.suffix) for p in files}
            if not files or None in kinds or len(kinds) > 1:
                raise DataError(f"{field}: '{path}' is not a saved dataset or data files of one format "
                                f"({', '.join(FORMATS)})")
            by_split = _files_by_split(files, path)
            loaded = datasets.load_dataset(kinds.pop(), data_files=by_split)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{field}: cannot read '{path}' with datasets: {type(exc).__name__}: {one_line(exc)[:300]}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{field}: '{path}' has no split '{split}'; splits: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _files_by_split(files: list[Path], root: Path) -> dict[str, list[str]]:
    """Files named after a split (``train.parquet``, ``test-00000.parquet``, ``validation/...``)
    form that split; any others form ``train``."""
    splits: dict[str, list[str]] = {}
    for f in files:
        stem = f.relative_to(root).parts[0] if root.is_dir() and f.parent != root else f.stem
        name = next((s for s in ("train", "validation", "test", "eval") if stem.split("-")[0].split(".")[0] == s), "train")
        splits.setdefault(name, []).append(str(f))
    return splits


def records(dataset: Any, options: HFOptions, field: str) -> list[dict[str, Any]]:
    columns = list(dataset.column_names)
    wanted = options.messages_field or options.prompt_field
    if wanted not in columns:
        raise DataError(f"{field}: the dataset has no column '{wanted}' "
                        f"({'messages_field' if options.messages_field else 'prompt_field'}); columns: {', '.join(columns)}")
    rows = dataset.to_list()
    for row in rows:
        if options.messages_field:
            row["messages"] = row.pop(options.messages_field)
        elif options.prompt_field != "prompt":
            row["prompt"] = row.pop(options.prompt_field)
    return rows


class HFTask(HeldPrompts):
    """Prompts from a local Hugging Face dataset."""

    def __init__(self, options: HFOptions, context):
        path = context.resolve_path(options.path)
        self.train = records(load_split(path, options.split, "data.path"), options, "data.path")
        if options.eval_split:
            self.eval = records(load_split(path, options.eval_split, "data.eval_split"), options, "data.eval_split")
        elif options.eval_path:
            eval_path = context.resolve_path(options.eval_path)
            self.eval = records(load_split(eval_path, "train", "data.eval_path"), options, "data.eval_path")
        elif options.eval_size:
            self.train, self.eval = hold_out(self.train, options.eval_size, options.split_seed)
        else:
            self.eval = []


@hookimpl
def zenalign_task_types():
    return [TaskType("hf", HFOptions, HFTask)]
