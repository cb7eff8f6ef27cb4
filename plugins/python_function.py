"""A reward computed by any Python function, given by import path.

    rewards:
      - type: python_function
        function: my_rewards:brevity        # module:attribute, or path/to/file.py:attribute
        kwargs: {limit: 40}                 # extra keyword arguments

The function receives, by parameter name, ``prompts``, ``completions``, ``completion_ids`` and the
prompt records' other fields, one entry per completion (TRL's reward-function convention), and
returns one score per completion (NaN or None to abstain).
"""

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from zenalign import hookimpl
from zenalign.errors import RecipeError, one_line
from zenalign.plugins import FunctionReward, Options, RewardSourceType


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
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            path = (path if path.is_absolute() else base_dir / path).resolve()
            if not path.is_file():
                raise RecipeError(f"python_function: file '{module_name}' does not exist (looked for {path})")
            unique = f"zenalign_reward_fn_{abs(hash(str(path)))}"
            module = sys.modules.get(unique)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(unique, path)
                module = importlib.util.module_from_spec(loader_spec)
                loader_spec.loader.exec_module(module)
                sys.modules[unique] = module
        else:
            module = importlib.import_module(module_name)
    except RecipeError:
        raise
    except Exception as exc:
        raise RecipeError(f"python_function: cannot import '{module_name}': {type(exc).__name__}: {one_line(exc)}") from exc
    try:
        function = getattr(module, attr)
    except AttributeError:
        raise RecipeError(f"python_function: '{module_name}' has no attribute '{attr}'") from None
    if not callable(function):
        raise RecipeError(f"python_function: '{spec}' is a {type(function).__name__}, not a function")
    return function


def build(options: PythonFunctionOptions, context):
    """A Python function as a reward: function(prompts, completions, **fields) -> scores."""
    function = import_function(options.function, context.base_dir)
    return FunctionReward(function, options.kwargs, name=options.function)


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("python_function", PythonFunctionOptions, build)]
