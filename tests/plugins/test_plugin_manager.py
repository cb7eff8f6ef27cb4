"""zenalign.plugins.manager on its own: the entry-point plugins a new manager holds, a recipe's
plugin files and modules, the checks `register` makes, and hook-call tracing."""

from __future__ import annotations

import sys

import pytest

from zenalign.errors import PluginError
from zenalign.plugins import manager
from zenalign.plugins.manager import load_plugins, new_plugin_manager, register, trace_hook_calls

PLUGIN = '''
from zenalign import Options, RewardSourceType, hookimpl


class Half:
    def __init__(self, options):
        pass

    def score(self, batch):
        return [0.5] * len(batch)


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("half_{tag}", Options, Half)]
'''


@pytest.fixture
def pm(monkeypatch):
    """A manager of its own, standing in for the process-wide one that load_plugins uses."""
    fresh = new_plugin_manager()
    monkeypatch.setattr(manager, "_manager", fresh)
    return fresh


def reward_types(pm) -> set[str]:
    return {t.name for types in pm.hook.zenalign_reward_source_types() for t in types}


def test_a_new_manager_holds_every_built_in_through_its_entry_point(pm):
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"exact_answer", "group_zscore", "policy_losses", "rollout_filters", "trackers"} <= names
    assert {"exact_answer", "regex_match", "length", "python_function"} <= reward_types(pm)


def test_a_plugin_file_is_loaded_relative_to_the_recipe_once(pm, tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "half.py").write_text(PLUGIN.format(tag="a"))
    load_plugins(["plugins/half.py"], tmp_path)
    load_plugins(["plugins/half.py"], tmp_path)  # a second recipe naming the same file: registered once
    assert "half_a" in reward_types(pm)
    assert sum(name.endswith("half.py") for name, _ in pm.list_name_plugin()) == 1


def test_two_files_of_the_same_name_in_different_folders_are_two_plugins(pm, tmp_path):
    for tag in ("a", "b"):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "half.py").write_text(PLUGIN.format(tag=tag))
        load_plugins([f"{tag}/half.py"], tmp_path)
    assert {"half_a", "half_b"} <= reward_types(pm)


def test_a_module_name_is_imported(pm, tmp_path, monkeypatch):
    (tmp_path / "my_half_plugin.py").write_text(PLUGIN.format(tag="m"))
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins(["my_half_plugin"], tmp_path)
    assert "half_m" in reward_types(pm)
    sys.modules.pop("my_half_plugin", None)


@pytest.mark.parametrize("spec, files, expected", [
    ("nowhere.py", {}, "plugins[0]: plugin file 'nowhere.py' does not exist (looked for "),
    ("broken.py", {"broken.py": "raise RuntimeError('plugin exploded')\n"},
     "plugins[0]: plugin file 'broken.py' failed to import: RuntimeError: plugin exploded"),
    ("no_such_module_for_zenalign", {}, "plugins[0]: no module named 'no_such_module_for_zenalign'; give an "
                                        "importable module name or a path to a .py file"),
], ids=["missing-file", "raises-on-import", "unknown-module"])
def test_a_plugin_that_cannot_be_loaded_is_one_line_naming_its_entry(pm, tmp_path, spec, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PluginError) as caught:
        load_plugins([spec], tmp_path)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_register_names_the_closest_hook_and_refuses_trainer_hooks(pm):
    class Typo:
        from zenalign.plugins import hookimpl

        @hookimpl
        def zenalign_normalizer_type(self):
            return []

    with pytest.raises(PluginError, match="'zenalign_normalizer_type' matches no zenalign hook; did you mean "
                                          "'zenalign_normalizer_types'"):
        register(pm, Typo(), name="typo")

    class Old:
        from zenalign.plugins import hookimpl

        @hookimpl
        def zenalign_on_step_end(self, trainer, step, metrics, samples):
            pass

    with pytest.raises(PluginError, match="zenalign_on_step_end takes 'trainer'.*take 'context' instead"):
        register(pm, Old(), name="old")
    assert pm.get_plugin("typo") is None and pm.get_plugin("old") is None


def test_tracing_writes_each_call_and_its_result_until_stopped(pm):
    lines: list[str] = []
    stop = trace_hook_calls(pm, lines.append)
    pm.hook.zenalign_normalizer_types()
    stop()
    pm.hook.zenalign_normalizer_types()
    assert lines[0].startswith("zenalign plugin trace: zenalign_normalizer_types() -> [")
    assert lines[1].startswith("zenalign plugin trace: zenalign_normalizer_types returned [")
    assert len(lines) == 2
