"""Everything a plugin author imports: the API types and capability protocols, ``hookimpl``, the
run context plugins receive, and the plugin manager and registry.

    from zenalign.plugins import hookimpl, Options, RewardSourceType

See docs/writing-a-plugin.md. The built-in plugins live outside this package, in the top-level
``plugins/`` directory (importable as ``zenalign_plugins``), and register through the same
entry-point group as third-party ones.
"""

from zenalign.plugins.api import (
    CAPABILITIES,
    AdvantageNormalizer,
    BuildContext,
    EnforcesConstraints,
    LearnsValues,
    NormalizerType,
    Objectives,
    ObservesScores,
    Options,
    PluginType,
    PolicyLoss,
    PolicyLossType,
    RefillsGroups,
    ReportsMetrics,
    RewardSource,
    RewardSourceType,
    RolloutFilter,
    RolloutFilterType,
    RolloutGroups,
    RunContext,
    ScoreBatch,
    Stateful,
    StatefulDirectory,
    Task,
    TaskType,
    TokenBatch,
    TokenLoss,
    enforces_constraints,
    valid_regex,
)
from zenalign.plugins.deadline import DeadlineExceeded, call_with_deadline
from zenalign.plugins.hookspecs import hookimpl, hookspec
from zenalign.plugins.manager import get_plugin_manager, load_plugins, new_plugin_manager, register, trace_hook_calls
from zenalign.plugins.registry import KINDS, PluginRegistry, collect_registry

__all__ = [
    "CAPABILITIES", "KINDS", "AdvantageNormalizer", "BuildContext", "DeadlineExceeded", "EnforcesConstraints", "LearnsValues", "NormalizerType",
    "Objectives", "ObservesScores", "Options", "PluginRegistry", "PluginType", "PolicyLoss", "PolicyLossType",
    "RefillsGroups", "ReportsMetrics", "RewardSource", "RewardSourceType", "RolloutFilter", "RolloutFilterType",
    "RolloutGroups", "RunContext", "ScoreBatch", "Stateful", "StatefulDirectory",
    "Task", "TaskType", "TokenBatch", "TokenLoss", "call_with_deadline", "collect_registry", "enforces_constraints", "get_plugin_manager", "hookimpl",
    "hookspec", "load_plugins", "new_plugin_manager", "register", "trace_hook_calls", "valid_regex",
]
