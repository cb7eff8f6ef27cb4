"""User-facing errors.

Every mistake a user can make (a bad recipe, an unknown plugin, a reward that misbehaves, a
missing model) raises a subclass of :class:`ZenalignError` whose message is one line naming the
file, field or plugin and what would be accepted. The CLI prints that line and exits with code 2;
the Python API lets the exception propagate.
"""

from __future__ import annotations


class ZenalignError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class RecipeError(ZenalignError):
    """The recipe file, an override, or a plugin's options are invalid."""


class PluginError(ZenalignError):
    """A plugin could not be found, imported, or registered."""


class RewardError(ZenalignError):
    """A reward source raised, or returned something other than one score per completion."""


class ModelLoadError(ZenalignError):
    """A model, tokenizer, or checkpoint directory is missing or unreadable."""


class DistributedError(ZenalignError):
    """A process of a multi-process run stopped, hung or died, so a collective operation failed."""


class NonFiniteError(ZenalignError):
    """A loss, gradient norm, advantage or weight became NaN or infinite."""


class StorageError(ZenalignError):
    """The run directory could not be written: a full disk, a quota, a read-only file system."""


class GenerationServerError(ZenalignError):
    """The vLLM server that generates (``sampling.vllm.mode: server``) cannot be reached, stopped
    answering, or serves another model than the run's."""


class DataError(ZenalignError):
    """The prompt source produced no usable prompts, or a prompt file is malformed."""


def one_line(text: str) -> str:
    """Collapse whitespace so an error message stays on a single line."""
    return " ".join(str(text).split())
