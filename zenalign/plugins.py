"""The one plugin manager: built-ins and third-party plugins through the entry-point group
``zenalign``, plus whatever a recipe's ``plugins:`` list names (module names or ``.py`` paths).

Built-in reward sources, normalizers and tasks live in ``plugins/`` (importable as
``zenalign_plugins``) and are registered through the same entry-point group as everybody else's,
so nothing in the core names a specific one.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pluggy

from zenalign import hookspecs
from zenalign.errors import PluginError, one_line
from zenalign.plugin_types import NormalizerType, PluginType, RewardSourceType, TaskType

ENTRY_POINT_GROUP = "zenalign"

# kind -> (hook name, type class, what the recipe calls it)
KINDS: dict[str, tuple[str, type[PluginType], str]] = {
    "reward": ("zenalign_reward_source_types", RewardSourceType, "reward source"),
    "normalizer": ("zenalign_normalizer_types", NormalizerType, "normalizer"),
    "task": ("zenalign_task_types", TaskType, "task"),
}

_manager: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every entry-point plugin loaded.

    Tests may ``register`` a throwaway plugin on it and ``unregister`` it in ``finally``.
    """
    global _manager
    if _manager is None:
        _manager = new_plugin_manager()
    return _manager


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager with only the installed (entry-point) plugins, built-ins included."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    _load_entry_points(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not show a traceback
            dist = ep.dist.name if ep.dist else "unknown distribution"
            raise PluginError(
                f"plugin '{ep.name}' (entry point {ep.value} from {dist}) failed to import: "
                f"{type(exc).__name__}: {one_line(exc)}"
            ) from exc
        pm.register(plugin, name=ep.name)


def load_plugins(specs: Iterable[str], base_dir: Path, where: str = "plugins") -> None:
    """Import and register each plugin named by a recipe: a module name or a ``.py`` path.

    Relative ``.py`` paths are resolved against ``base_dir`` (the recipe's directory).
    """
    pm = get_plugin_manager()
    for index, spec in enumerate(specs):
        label = f"{where}[{index}]"
        if spec.endswith(".py") or "/" in spec or "\\" in spec:
            module, name = _import_path(spec, base_dir, label)
        else:
            module, name = _import_module(spec, label)
        if pm.get_plugin(name) is None and not pm.is_registered(module):
            try:
                pm.register(module, name=name)
            except (ValueError, pluggy.PluginValidationError) as exc:
                raise PluginError(f"{label}: plugin '{spec}' is not a valid zenalign plugin: {one_line(exc)}") from exc


def _import_module(spec: str, label: str):
    try:
        return importlib.import_module(spec), spec
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise PluginError(
                f"{label}: no module named '{spec}'; give an importable module name or a path to a .py file"
            ) from exc
        raise PluginError(f"{label}: plugin '{spec}' failed to import: ModuleNotFoundError: {one_line(exc)}") from exc
    except Exception as exc:
        raise PluginError(f"{label}: plugin '{spec}' failed to import: {type(exc).__name__}: {one_line(exc)}") from exc


def _import_path(spec: str, base_dir: Path, label: str):
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    path = path.resolve()
    if not path.is_file():
        raise PluginError(f"{label}: plugin file '{spec}' does not exist (looked for {path})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"zenalign_recipe_plugin_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name], str(path)
    spec_obj = importlib.util.spec_from_file_location(module_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise PluginError(f"{label}: plugin file '{spec}' cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[module_name] = module
    try:
        spec_obj.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginError(
            f"{label}: plugin file '{spec}' failed to import: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    return module, str(path)


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
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name
            try:
                provided = impl.function() or []
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
