"""The plugin protocol, declared once: capability Protocols tested with isinstance, the run
context plugins get instead of the trainer, hook names checked at registration, hook-call
tracing, and plugin files written against the 0.1 docs."""

from __future__ import annotations

import ast
import inspect
import warnings

import pytest
import torch

from helpers import REPO, run_cli
from zenalign import GRPOTrainer
from zenalign.errors import PluginError
from zenalign.plugins import (CAPABILITIES, KIND_PROTOCOLS, AdvantageNormalizer, Critic, EnforcesConstraints,
                              NormalizerType, ObservesScores, Options, PolicyLossType, ReportsMetrics,
                              RewardSourceType, RolloutFilterType, RunContext, Stateful, StatefulDirectory, TaskType,
                              check_kind, enforces_constraints, get_plugin_manager, hookimpl, register,
                              trace_hook_calls)
from zenalign.plugins.api import protocol_members
from zenalign.plugins import hookspecs
from zenalign.train.state import stateful_plugins

PROMPTS = [{"prompt": f"reverse {w}:", "answer": w[::-1]} for w in ["abc", "hello", "xyz", "kite"]]
DOC = (REPO / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")
CAPABILITY_NAMES = ("state_dict", "load_state_dict", "save_state", "load_state", "metrics", "on_scored",
                    "enforces_constraints")


def test_every_capability_is_a_documented_runtime_protocol():
    for protocol in CAPABILITIES:
        assert getattr(protocol, "_is_runtime_protocol", False), protocol
        assert inspect.getdoc(protocol), f"{protocol.__name__} has no docstring"
        assert f"`{protocol.__name__}`" in DOC, f"docs/writing-a-plugin.md does not name {protocol.__name__}"
    assert "`RunContext`" in DOC
    for member in ("step", "seed", "rank", "world_size", "is_main", "output_dir", "gather_objects", "gather_rows",
                   "reset_reference_to_policy"):
        assert f"`{member}" in DOC, f"docs/writing-a-plugin.md does not describe RunContext.{member}"


def test_capabilities_are_recognised_by_their_methods():
    class Counter:
        enforces_constraints = True

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

        def metrics(self):
            return {"n": 1.0}

    class Plain:
        def score(self, batch):
            return [0.0] * len(batch)

    class Observer:
        def on_scored(self, batch, rewards, objectives, context):
            pass

        def save_state(self, directory):
            pass

        def load_state(self, directory):
            pass

    counter, plain, observer = Counter(), Plain(), Observer()
    assert isinstance(counter, Stateful) and isinstance(counter, ReportsMetrics) and enforces_constraints(counter)
    assert isinstance(counter, EnforcesConstraints) and not isinstance(counter, StatefulDirectory)
    assert not any(isinstance(plain, p) for p in CAPABILITIES) and not enforces_constraints(plain)
    assert isinstance(observer, ObservesScores) and isinstance(observer, StatefulDirectory)
    assert stateful_plugins(counter, [plain, observer]) == {"normalizer": counter, "rewards-1": observer}


def declared_members() -> set[str]:
    """Every method and attribute a capability or a kind's protocol declares."""
    return {name for protocol in (*CAPABILITIES, *(p for ps in KIND_PROTOCOLS.values() for p in ps))
            for name in protocol_members(protocol)}


def probes(source: str, names: set[str]) -> list[tuple[int, str]]:
    """``getattr``/``hasattr`` calls that look up one of ``names``, and attributes named ``_zenalign...``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and (node.args[1].value in names or str(node.args[1].value).startswith("_zenalign"))):
            found.append((node.lineno, f"{node.func.id}(..., {node.args[1].value!r})"))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_zenalign"):
            found.append((node.lineno, f".{node.attr}"))
    return found


def test_the_engine_asks_for_capabilities_with_isinstance_never_a_probe():
    """Issue 31: every capability the engine looks for is declared in zenalign.plugins and tested
    with isinstance; nothing is looked up by name on a plugin object, and nothing of zenalign's is
    stored on a model object. plugins/api.py is where the declared contract is checked."""
    names = declared_members() | {"choose", "objectives", "reads_fields", "takes_token_advantages", "state_dict"}
    found = [f"{path.relative_to(REPO)}:{line} {what}" for path in sorted((REPO / "zenalign").rglob("*.py"))
             if path.name != "api.py" for line, what in probes(path.read_text(encoding="utf-8"), names)]
    assert found == []
    # the scan finds what it looks for
    assert [w for _, w in probes("getattr(loss, 'takes_token_advantages', True)\nmodel._zenalign_lean = 1", names)] == \
        ["getattr(..., 'takes_token_advantages')", "._zenalign_lean"]


class NoScore:
    def __init__(self, options):
        pass


class HalfALoss:
    skips_zero_advantage_rows = True

    def __init__(self, options):
        pass

    def token_weights(self, mask, num_sequences=None, num_tokens=None):
        return mask


@pytest.mark.parametrize("type_cls, factory, expected", [
    (RewardSourceType, NoScore, "type 'odd' built a NoScore without score; it needs score(batch)"),
    (NormalizerType, NoScore, "type 'odd' built a NoScore without __call__; it needs __call__(rewards, objectives) or "
                              "token_advantages(tokens, rewards, objectives, context), train_critic(tokens, context) and "
                              "reference_kl_coef"),
    (TaskType, NoScore, "type 'odd' built a NoScore without train_prompts, eval_prompts; it needs train_prompts() and "
                        "eval_prompts()"),
    (PolicyLossType, HalfALoss, "type 'odd' built a HalfALoss without per_token; it needs per_token(logp, old_logp, "
                                "advantages, ref_logp, mask), token_weights(mask, ...) and skips_zero_advantage_rows"),
    (RolloutFilterType, NoScore, "type 'odd' built a NoScore without __call__; it needs __call__(groups, objectives)"),
], ids=["reward", "normalizer", "task", "loss", "filter"])
def test_each_kind_checks_what_its_factory_built(type_cls, factory, expected):
    with pytest.raises(PluginError) as caught:
        type_cls("odd", Options, factory).build(Options())
    assert str(caught.value) == expected


def test_a_critic_is_not_a_normalizer_and_needs_no_call():
    from zenalign_plugins.ppo_critic import GAECritic

    assert not isinstance(GAECritic, type(None)) and "__call__" not in vars(GAECritic)
    critic = GAECritic.__new__(GAECritic)
    critic.reference_kl_coef = 0.0
    assert isinstance(critic, Critic) and not isinstance(critic, AdvantageNormalizer)
    assert check_kind(NormalizerType("gae", Options, GAECritic), critic) is critic


@pytest.mark.slow
def test_a_reward_type_without_score_is_one_line_at_validate(tmp_path):
    (tmp_path / "noscore.py").write_text(
        "from zenalign import Options, RewardSourceType, hookimpl\n\n"
        "class Judge:\n    def __init__(self, options):\n        pass\n\n"
        "    def rate(self, batch):\n        return [0.0] * len(batch)\n\n"
        "@hookimpl\ndef zenalign_reward_source_types():\n    return [RewardSourceType('judge', Options, Judge)]\n")
    recipe = (REPO / "recipes" / "quickstart.yaml").read_text().replace("model:\n  path: models/reverse-policy",
                                                                         f"model:\n  path: {REPO}/recipes/models/reverse-policy")
    (tmp_path / "r.yaml").write_text(recipe + "plugins: [noscore.py]\n")
    result = run_cli("validate", str(tmp_path / "r.yaml"), "rewards=[{type: judge}]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "r.yaml: rewards[0] (judge): type 'judge' built a Judge without score" in lines[0], lines


class Watcher:
    """A reward source that observes scored batches and reports a metric."""

    def __init__(self):
        self.seen = []

    def score(self, batch):
        return [float(c.strip() == a) for c, a in zip(batch.completions, batch.columns["answer"])]

    def on_scored(self, batch, rewards, objectives, context):
        self.seen.append((context, context.step, context.seed, context.rank, context.world_size, tuple(rewards.shape)))

    def metrics(self):
        return {"observed": float(len(self.seen))}


@pytest.mark.slow
def test_plugins_get_a_run_context_never_the_trainer(tmp_path, tiny_model_dir, register_plugin):
    events = []

    class Events:
        @hookimpl
        def zenalign_on_step_end(self, context, step, metrics):
            events.append(("step", context.step, step, metrics["watch/observed"]))

        @hookimpl
        def zenalign_on_train_end(self, context, step):
            events.append(("end", step, context.is_main, context.output_dir))

    register_plugin(Events(), name="test-events")
    watcher = Watcher()
    watcher.name = "watch"
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_model=watcher, steps=2, group_size=2, prompts_per_step=2,
                          max_new_tokens=3, seed=7, output_dir=str(tmp_path / "run"), progress_bar=False)
    trainer.train(PROMPTS)
    context = watcher.seen[0][0]
    assert isinstance(context, RunContext) and not isinstance(context, GRPOTrainer)
    assert [s[1:] for s in watcher.seen] == [(1, 7, 0, 1, (4, 1)), (2, 7, 0, 1, (4, 1))]
    assert events == [("step", 1, 1, 1.0), ("step", 2, 2, 2.0), ("end", 2, True, tmp_path / "run")]


def test_a_hook_name_matching_no_hook_names_the_closest(register_plugin):
    class Typo:
        @hookimpl
        def zenalign_on_stp_end(self, metrics):
            pass

    with pytest.raises(PluginError, match="plugin 'typo-plugin': @hookimpl 'zenalign_on_stp_end' matches no zenalign "
                                          "hook; did you mean 'zenalign_on_step_end'"):
        register(get_plugin_manager(), Typo(), name="typo-plugin")
    assert get_plugin_manager().get_plugin("typo-plugin") is None


def test_an_event_hook_still_taking_the_trainer_says_what_to_write():
    class Old:
        @hookimpl
        def zenalign_on_step_end(self, trainer, step, metrics):
            pass

    with pytest.raises(PluginError, match="zenalign_on_step_end takes 'trainer'.*take 'context' instead"):
        register(get_plugin_manager(), Old(), name="old-plugin")


def test_a_misspelled_hook_in_a_recipe_plugin_is_a_one_line_error(tmp_path):
    (tmp_path / "typo.py").write_text(
        "from zenalign import hookimpl\n\n@hookimpl\ndef zenalign_reward_sourse_types():\n    return []\n")
    recipe = (REPO / "recipes" / "quickstart.yaml").read_text().replace("model:\n  path: models/reverse-policy",
                                                                         f"model:\n  path: {REPO}/recipes/models/reverse-policy")
    (tmp_path / "r.yaml").write_text(recipe + "plugins: [typo.py]\n")
    result = run_cli("validate", str(tmp_path / "r.yaml"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "zenalign_reward_sourse_types" in lines[0]
    assert "did you mean 'zenalign_reward_source_types'" in lines[0] and "Traceback" not in result.stderr


def test_tracing_prints_each_hook_call_and_its_result():
    pm = get_plugin_manager()
    lines = []
    undo = trace_hook_calls(pm, write=lines.append)
    try:
        pm.hook.zenalign_normalizer_types()
    finally:
        undo()
    assert lines[0].startswith("zenalign plugin trace: zenalign_normalizer_types() -> [")
    assert "group_zscore" in lines[0]  # the built-in that implements it
    assert lines[1].startswith("zenalign plugin trace: zenalign_normalizer_types returned [")
    pm.hook.zenalign_normalizer_types()
    assert len(lines) == 2  # monitoring was undone


def test_the_trace_variable_turns_tracing_on_for_the_cli():
    import os
    import subprocess
    import sys

    env = dict(os.environ, ZENALIGN_TRACE_PLUGINS="1")
    result = subprocess.run([sys.executable, "-m", "zenalign", "plugins"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "zenalign plugin trace: zenalign_reward_source_types() -> [" in result.stderr
    assert "zenalign plugin trace: zenalign_reward_source_types returned [" in result.stderr
    quiet = subprocess.run([sys.executable, "-m", "zenalign", "plugins"], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env={k: v for k, v in os.environ.items() if k != "ZENALIGN_TRACE_PLUGINS"})
    assert "plugin trace" not in quiet.stderr


OLD_PLUGIN = '''
import torch
from zenalign import NormalizerType, Options, hookimpl
from zenalign.advantages import combine_objectives, finish, nan_mean


class SignOnly:
    def __call__(self, rewards, objectives):
        r = combine_objectives(rewards, objectives.weights)
        return finish(torch.sign(r - nan_mean(r)), r)


@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("sign_only_01", Options, SignOnly)]
'''


def test_a_plugin_written_against_the_old_docs_still_loads_with_a_warning_naming_the_new_import(tmp_path):
    from zenalign.plugins import load_plugins, collect_registry

    (tmp_path / "sign_only.py").write_text(OLD_PLUGIN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_plugins(["sign_only.py"], tmp_path)
    assert any("zenalign.advantages moved to zenalign.grpo.advantages" in str(w.message) for w in caught)
    normalizer = collect_registry().get("normalizer", "sign_only_01").build(None)
    rewards = torch.tensor([[[1.0], [0.0], [2.0]]], dtype=torch.float64)
    from zenalign import Objectives

    out = normalizer(rewards, Objectives(("r",), torch.tensor([1.0], dtype=torch.float64)))
    assert out.tolist() == [[0.0, -1.0, 1.0]]  # mean 1: sign(0), sign(-1), sign(1)


def test_old_module_names_are_the_new_modules():
    import zenalign.grpo.advantages
    import zenalign.plugins.api

    with pytest.warns(FutureWarning, match="zenalign.plugin_types moved to zenalign.plugins.api"):
        import zenalign.plugin_types as old
    assert old is zenalign.plugins.api
    import zenalign.plugins.advantages

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import zenalign.advantages as split  # its names now live in two modules
        import zenalign.grpo.loss as loss  # issue 31: the formulas plugins use moved down to zenalign.plugins
    assert split.compute_advantages is zenalign.grpo.advantages.compute_advantages
    assert split.combine_objectives is zenalign.plugins.advantages.combine_objectives
    assert loss.GRPOLoss is zenalign.plugins.GRPOLoss


def test_every_hookspec_documents_its_call_rule():
    for name in dir(hookspecs):
        if name.startswith("zenalign_"):
            doc = inspect.getdoc(getattr(hookspecs, name)) or ""
            assert "Call rule:" in doc, f"{name} does not state its call rule"


def test_the_run_context_declares_a_narrow_view_of_the_run():
    """RunContext declares where the run is, the collectives and one action: nothing reaches the trainer."""
    methods = {name for name, value in vars(RunContext).items() if callable(value) and not name.startswith("_")}
    assert set(RunContext.__annotations__) | methods == {
        "step", "seed", "rank", "world_size", "is_main", "output_dir", "run_id", "recipe", "gather_objects", "gather_rows",
        "reset_reference_to_policy"}
