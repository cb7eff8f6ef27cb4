"""Everything a plugin author imports: the API types and capability protocols, ``hookimpl``, the
run context plugins receive, and the plugin manager and registry.

    from zenalign.plugins import hookimpl, Options, RewardSourceType

See docs/writing-a-plugin.md. The built-in plugins live outside this package, in the top-level
``plugins/`` directory (importable as ``zenalign_plugins``), and register through the same
entry-point group as third-party ones.
"""

from zenalign.plugins.api import (
    CAPABILITIES,
    KIND_PROTOCOLS,
    AdvantageNormalizer,
    BuildContext,
    Critic,
    EnforcesConstraints,
    Environment,
    EnvironmentType,
    LearnsValues,
    NamesItself,
    NamesObjectives,
    NormalizerType,
    Objectives,
    ObservesScores,
    Options,
    PluginType,
    PolicyLoss,
    PolicyLossType,
    ReadsFields,
    RefillsGroups,
    ReportsMetrics,
    RewardSource,
    RewardSourceType,
    RolloutFilter,
    RolloutFilterType,
    RolloutGroups,
    RunContext,
    ScoreBatch,
    SequenceAdvantagesOnly,
    Stateful,
    StatefulDirectory,
    Task,
    TaskType,
    TokenBatch,
    TokenLoss,
    check_kind,
    default_name,
    enforces_constraints,
    fields_read,
    objective_names,
    takes_token_advantages,
    valid_regex,
)
from zenalign.plugins.deadline import DeadlineExceeded, call_with_deadline
from zenalign.plugins.functions import FunctionReward, import_object
from zenalign.plugins.hookspecs import hookimpl, hookspec
from zenalign.plugins.manager import get_plugin_manager, load_plugins, new_plugin_manager, register, trace_hook_calls
from zenalign.plugins.registry import KINDS, PluginRegistry, collect_registry

# The arithmetic the built-in plugins are made of, for yours too. Imported when first asked for, so
# that `import zenalign.plugins` (and `zenalign validate`) does not load torch.
HELPERS = {
    "zenalign.plugins.advantages": ("all_abstain", "combine_objectives", "finish", "nan_mean", "nan_std",
                                    "standardize_groups", "standardize_objectives", "valid_count", "weighted_sum",
                                    "zero_variance"),
    "zenalign.plugins.losses": ("AggregationOptions", "GRPOLoss", "GRPOLossOptions", "KLOptions", "add_kl_penalty",
                                "high_entropy_tokens", "kl_estimate", "per_token_advantages", "token_weights"),
    "zenalign.plugins.ppo": ("clipped_value_loss", "gae", "token_rewards", "whiten"),
}
_HELPER_MODULE = {name: module for module, names in HELPERS.items() for name in names}


def __getattr__(name: str):
    if name in _HELPER_MODULE:
        import importlib

        return getattr(importlib.import_module(_HELPER_MODULE[name]), name)
    raise AttributeError(f"module 'zenalign.plugins' has no attribute {name!r}")


__all__ = [
    "CAPABILITIES", "KINDS", "KIND_PROTOCOLS", "AdvantageNormalizer", "BuildContext", "Critic", "DeadlineExceeded", "EnforcesConstraints", "Environment", "EnvironmentType", "FunctionReward", "LearnsValues", "NamesItself", "NamesObjectives", "NormalizerType",
    "Objectives", "ObservesScores", "Options", "PluginRegistry", "PluginType", "PolicyLoss", "PolicyLossType",
    "ReadsFields", "RefillsGroups", "ReportsMetrics", "RewardSource", "RewardSourceType", "RolloutFilter", "RolloutFilterType",
    "RolloutGroups", "RunContext", "ScoreBatch", "SequenceAdvantagesOnly", "Stateful", "StatefulDirectory",
    "Task", "TaskType", "TokenBatch", "TokenLoss", "call_with_deadline", "check_kind", "collect_registry", "default_name", "enforces_constraints", "fields_read", "get_plugin_manager", "hookimpl",
    "hookspec", "import_object", "load_plugins", "new_plugin_manager", "objective_names", "register", "takes_token_advantages",
    "trace_hook_calls", "valid_regex",
    *_HELPER_MODULE,
]
