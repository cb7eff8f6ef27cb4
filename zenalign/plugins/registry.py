"""The registry: every reward source, normalizer, task, policy loss, rollout filter and environment type the
registered plugins provide, by kind and name, with the plugin that provides each."""

from __future__ import annotations

from dataclasses import dataclass, field

import pluggy

from zenalign.errors import PluginError, one_line
from zenalign.plugins.api import (EnvironmentType, NormalizerType, PluginType, PolicyLossType, RewardSourceType, RolloutFilterType,
                                  TaskType)
from zenalign.plugins.manager import get_plugin_manager

# kind -> (hook name, type class, what the recipe calls it)
KINDS: dict[str, tuple[str, type[PluginType], str]] = {
    "reward": ("zenalign_reward_source_types", RewardSourceType, "reward source"),
    "normalizer": ("zenalign_normalizer_types", NormalizerType, "normalizer"),
    "task": ("zenalign_task_types", TaskType, "task"),
    "loss": ("zenalign_policy_loss_types", PolicyLossType, "policy loss"),
    "filter": ("zenalign_rollout_filter_types", RolloutFilterType, "rollout filter"),
    "environment": ("zenalign_environment_types", EnvironmentType, "environment"),
}


@dataclass
class PluginRegistry:
    """The types every registered plugin provides, by kind and name."""

    types: dict[str, dict[str, PluginType]] = field(default_factory=dict)
    providers: dict[tuple[str, str], str] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> PluginType:
        try:
            return self.types[kind][name]
        except KeyError:
            noun = KINDS[kind][2]
            raise PluginError(
                f"unknown {noun} type '{name}'; installed: {', '.join(self.names(kind)) or 'none'}"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.types.get(kind, {}))

    def default(self, kind: str) -> str | None:
        """The name of the type marked ``default=True`` for this kind, if any."""
        defaults = [name for name, t in self.types.get(kind, {}).items() if t.default]
        if len(defaults) > 1:
            owners = ", ".join(f"'{n}' ({self.providers[(kind, n)]})" for n in sorted(defaults))
            raise PluginError(f"several {KINDS[kind][2]} types claim to be the default: {owners}")
        return defaults[0] if defaults else None


def collect_registry(pm: pluggy.PluginManager | None = None) -> PluginRegistry:
    """Ask every plugin for its types. Each hook implementation is called on its own so that a
    bad return value or a duplicate name can be blamed on the plugin that caused it."""
    pm = pm or get_plugin_manager()
    registry = PluginRegistry()
    for kind, (hook_name, type_cls, noun) in KINDS.items():
        registry.types[kind] = {}
        impls = getattr(pm.hook, hook_name).get_hookimpls()
        for impl in impls:
            plugin = impl.plugin_name
            # one plugin at a time, through pluggy (so ZENALIGN_TRACE_PLUGINS shows the call)
            only_this = pm.subset_hook_caller(hook_name, [other.plugin for other in impls if other is not impl])
            try:
                provided = next(iter(only_this()), None) or []
            except Exception as exc:
                raise PluginError(f"plugin '{plugin}': {hook_name}() raised {type(exc).__name__}: {one_line(exc)}") from exc
            for item in provided:
                if not isinstance(item, type_cls):
                    raise PluginError(
                        f"plugin '{plugin}': {hook_name}() must return {type_cls.__name__} objects, "
                        f"got {type(item).__name__}"
                    )
                if item.name in registry.types[kind]:
                    other = registry.providers[(kind, item.name)]
                    raise PluginError(f"{noun} type '{item.name}' is provided by both '{other}' and '{plugin}'")
                registry.types[kind][item.name] = item
                registry.providers[(kind, item.name)] = plugin
    return registry
