"""The built-in environments: plain tools, and any TRL-style environment class.

    environment:
      type: python_tools                  # the recipe's tools, nothing else
      tools: [tools.py:lookup, zenalign.plugins.sandbox:python]

    environment:
      type: environment_class             # one instance per episode, as TRL's environment_factory
      factory: my_env.py:Inventory        # its public methods are tools; reset(**record); get_reward()
      kwargs: {shelves: 4}

The budgets (max_turns, max_episode_tokens, tool_timeout_s, max_tool_output_chars) are fields of
every environment entry (docs/agents.md).
"""

from typing import Any

from pydantic import Field

from zenalign import hookimpl
from zenalign.plugins import EnvironmentType, Options, import_object


class ToolsOnly:
    """Episodes with the recipe's tools and no state of their own."""

    def new_episode(self) -> None:
        return None


class PythonToolsOptions(Options):
    pass


def tools_only(options: PythonToolsOptions) -> ToolsOnly:
    """The recipe's `tools` (plain functions), with no environment state."""
    return ToolsOnly()


class ClassEnvironment:
    """Episodes made by calling a class (or any factory) with the entry's keyword arguments."""

    def __init__(self, factory: Any, kwargs: dict[str, Any]):
        self.factory, self.kwargs = factory, kwargs

    def new_episode(self) -> Any:
        return self.factory(**self.kwargs)


class ClassOptions(Options):
    factory: str = Field(description="The environment class (TRL's environment_factory): 'module:Class' or "
                                     "'path/to/file.py:Class', relative to the recipe.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for each instance.")


def class_environment(options: ClassOptions, context) -> ClassEnvironment:
    """A TRL-style environment class: one instance per episode, its public methods the tools."""
    return ClassEnvironment(import_object(options.factory, context.base_dir, "environment.factory"), options.kwargs)


@hookimpl
def zenalign_environment_types():
    return [EnvironmentType("python_tools", PythonToolsOptions, tools_only, default=True),
            EnvironmentType("environment_class", ClassOptions, class_environment)]
