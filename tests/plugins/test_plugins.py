"""The plugin system: entry points, throwaway plugins, recipe-named plugins, hook documentation."""

import ast
import importlib.metadata
import inspect
from pathlib import Path

import pytest
import torch

from helpers import REPO
from zenalign import Options, RewardSourceType, ScoreBatch, hookimpl
from zenalign.errors import PluginError
from zenalign.plugins import collect_registry, hookspecs
from zenalign.recipe.loader import validate_recipe

BUILTIN_MODULES = {
    "exact_answer", "regex_match", "length", "python_function", "group_zscore", "rank", "dr_grpo", "rloo",
    "batch_zscore", "prompt_sources", "reverse_task",
}


def validate(data, base_dir=None):
    return validate_recipe(data, source="r.yaml", base_dir=base_dir or Path.cwd(), name="r")


def test_builtins_arrive_through_the_entry_point_group():
    names = {ep.name for ep in importlib.metadata.entry_points(group="zenalign")}
    assert BUILTIN_MODULES <= names
    registry = collect_registry()
    assert registry.providers[("reward", "exact_answer")] == "exact_answer"
    assert registry.providers[("normalizer", "rloo")] == "rloo"
    assert set(registry.names("normalizer")) >= {"group_zscore", "rank", "dr_grpo", "rloo", "batch_zscore"}
    assert set(registry.names("reward")) >= {"exact_answer", "regex_match", "length", "python_function"}


class ShoutOptions(Options):
    bonus: float = 1.0


class Shout:
    """Rewards completions written in capitals."""

    def __init__(self, options: ShoutOptions):
        self.bonus = options.bonus

    def score(self, batch: ScoreBatch):
        return [self.bonus if c.isupper() else 0.0 for c in batch.completions]


class ShoutPlugin:
    @hookimpl
    def zenalign_reward_source_types(self):
        return [RewardSourceType("shout", ShoutOptions, Shout)]


def test_throwaway_plugin_adds_a_reward_type(register_plugin):
    register_plugin(ShoutPlugin(), name="shout-plugin")
    loaded = validate({"rewards": [{"type": "shout", "bonus": 2.5}]})
    entry = loaded.recipe.rewards[0]
    source = loaded.registry.get("reward", "shout").build(entry)
    assert source.score(ScoreBatch(prompts=["p", "p"], completions=["LOUD", "quiet"])) == [2.5, 0.0]
    with pytest.raises(Exception, match="rewards\\[0\\].bonsu: unknown field"):
        validate({"rewards": [{"type": "shout", "bonsu": 1}]})


def test_throwaway_plugin_is_gone_after_its_fixture():
    assert "shout" not in collect_registry().names("reward")


def test_two_plugins_with_one_name_are_both_named(register_plugin):
    class Again:
        @hookimpl
        def zenalign_reward_source_types(self):
            return [RewardSourceType("regex_match", ShoutOptions, Shout)]

    register_plugin(Again(), name="copycat")
    with pytest.raises(PluginError, match="'regex_match' is provided by both 'regex_match' and 'copycat'"):
        collect_registry()


def test_a_hook_returning_the_wrong_thing_is_blamed(register_plugin):
    class Wrong:
        @hookimpl
        def zenalign_normalizer_types(self):
            return ["rank"]

    register_plugin(Wrong(), name="wrong-plugin")
    with pytest.raises(PluginError, match="plugin 'wrong-plugin': zenalign_normalizer_types\\(\\) must return NormalizerType objects, got str"):
        collect_registry()


PLUGIN_FILE = '''
"""Negated rewards as advantages: a deliberately odd normalizer for the test."""
from zenalign import hookimpl, NormalizerType, Options
from zenalign.plugins.advantages import combine_objectives, finish

class Negate:
    def __call__(self, rewards, objectives):
        r = combine_objectives(rewards, objectives.weights)
        return finish(-r, r)

@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("negate_{tag}", Options, Negate)]
'''


def test_recipe_loads_a_plugin_from_a_py_path(tmp_path):
    plugin_dir = tmp_path / "my_plugins"
    plugin_dir.mkdir()
    (plugin_dir / "negate.py").write_text(PLUGIN_FILE.format(tag="path"))
    loaded = validate({"plugins": ["my_plugins/negate.py"], "normalizer": {"type": "negate_path"}}, base_dir=tmp_path)
    normalizer = loaded.registry.get("normalizer", "negate_path").build(loaded.recipe.normalizer)
    rewards = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    from zenalign.plugins import Objectives

    assert normalizer(rewards, Objectives(("r",), torch.ones(1, dtype=torch.float64))).tolist() == [[-1.0, -3.0]]
    # loading the same recipe twice registers the file once
    validate({"plugins": [str(plugin_dir / "negate.py")]}, base_dir=tmp_path)


def test_recipe_loads_a_plugin_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "negate_module_plugin.py").write_text(PLUGIN_FILE.format(tag="module"))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = validate({"plugins": ["negate_module_plugin"], "normalizer": {"type": "negate_module"}})
    assert loaded.recipe.normalizer.type == "negate_module"


def hookspec_functions():
    return [
        (name, fn) for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, "zenalign_spec")
    ]


def test_every_hook_is_prefixed_typed_and_states_its_call_rule():
    specs = hookspec_functions()
    assert {name for name, _ in specs} >= {
        "zenalign_reward_source_types", "zenalign_normalizer_types", "zenalign_task_types", "zenalign_on_step_end",
    }
    for name, fn in specs:
        assert name.startswith("zenalign_")
        assert "Call rule:" in (fn.__doc__ or ""), name
        assert "return" in fn.__annotations__, name


def test_every_hook_is_documented_with_its_exact_signature():
    doc = (REPO / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")
    for name, fn in hookspec_functions():
        signature = f"def {name}{inspect.signature(fn)}"
        assert signature.replace("'", "") in doc, f"docs/writing-a-plugin.md lacks `{signature}`"


def test_core_modules_name_no_specific_reward_source_or_normalizer():
    registry = collect_registry()
    plugin_names = set(registry.names("reward")) | set(registry.names("normalizer"))
    offenders = []
    package = REPO / "zenalign"
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in plugin_names:
                # "dr_grpo" is also the name of a loss aggregation mode (loss.aggregation)
                if node.value == "dr_grpo" and name in ("recipe/schema.py", "plugins/losses.py"):
                    continue
                # the helper functions zenalign.plugins exports include gae(), generalized advantage estimation
                if node.value == "gae" and name == "plugins/__init__.py":
                    continue
                # TRL's loss_type and scale_rewards name built-in plugins: that table is the point of this module
                if name == "recipe/trl_fields.py":
                    continue
                offenders.append(f"{name}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_plugin_guide_embeds_the_shipped_example_verbatim():
    doc = (REPO / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")
    example = (REPO / "recipes" / "examples" / "position_match.py").read_text(encoding="utf-8")
    assert f"```python\n{example}```" in doc
