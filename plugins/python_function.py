"""A reward computed by any Python function, given by import path.

    rewards:
      - type: python_function
        function: my_rewards:brevity        # module:attribute, or path/to/file.py:attribute
        kwargs: {limit: 40}                 # extra keyword arguments

The function receives, by parameter name, ``prompts``, ``completions``, ``completion_ids`` and the
prompt records' other fields, one entry per completion (TRL's reward-function convention), and
returns one score per completion (NaN or None to abstain).
"""

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from zenalign import hookimpl
from zenalign.plugins import FunctionReward, Options, RewardSourceType
from zenalign.plugins.functions import import_object


class PythonFunctionOptions(Options):
    function: str = Field(description="'module:attribute' or 'path/to/file.py:attribute' (relative to the recipe).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for every call.")

    @field_validator("function")
    @classmethod
    def _has_attribute(cls, value):
        module, sep, attr = value.rpartition(":")
        if not sep or not module or not attr:
            raise ValueError("expected 'module:attribute' or 'path/to/file.py:attribute'")
        return value


def import_function(spec: str, base_dir: Path):
    """Resolve 'module:attr' or 'file.py:attr' to the object it names."""
    return import_object(spec, base_dir, "python_function")


def build(options: PythonFunctionOptions, context):
    """A Python function as a reward: function(prompts, completions, **fields) -> scores."""
    function = import_function(options.function, context.base_dir)
    return FunctionReward(function, options.kwargs, name=options.function)


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("python_function", PythonFunctionOptions, build)]
