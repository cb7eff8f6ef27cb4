"""The one plugin manager: built-ins and third-party plugins through the entry-point group
``zenalign``, plus whatever a recipe's ``plugins:`` list names (module names or ``.py`` paths).

Every plugin goes through :func:`register`, which refuses a ``@hookimpl`` whose name matches no
hook (naming the closest one) before pluggy sees it. ``ZENALIGN_TRACE_PLUGINS=1`` prints every hook
call, its arguments and its result to stderr (pluggy's hook-call monitoring).

Built-in reward sources, normalizers and tasks live in ``plugins/`` (importable as
``zenalign_plugins``) and are registered through the same entry-point group as everybody else's,
so nothing in the core names a specific one.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

import pluggy

from zenalign.errors import PluginError, one_line
from zenalign.plugins import hookspecs

ENTRY_POINT_GROUP = "zenalign"
TRACE_VARIABLE = "ZENALIGN_TRACE_PLUGINS"
HOOK_NAMES = tuple(sorted(name for name in vars(hookspecs) if name.startswith("zenalign_")))

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
    if os.environ.get(TRACE_VARIABLE, "") not in ("", "0"):
        trace_hook_calls(pm)
    _load_entry_points(pm)
    return pm


def register(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> None:
    """Register ``plugin`` after checking each of its ``@hookimpl`` functions: a name that matches
    no hook, or an event hook still taking the trainer, is an error that names the plugin and
    says what to write instead."""
    label = name or getattr(plugin, "__name__", type(plugin).__name__)
    for attr in dir(plugin):
        if pm.parse_hookimpl_opts(plugin, attr) is None:
            continue
        if attr not in HOOK_NAMES:
            close = difflib.get_close_matches(attr, HOOK_NAMES, n=1, cutoff=0.0)
            raise PluginError(f"plugin '{label}': @hookimpl '{attr}' matches no zenalign hook; did you mean "
                              f"'{close[0]}'? (hooks: {', '.join(HOOK_NAMES)})")
        if "trainer" in _parameters(getattr(plugin, attr)):
            raise PluginError(f"plugin '{label}': {attr} takes 'trainer', which hooks no longer receive; take "
                              f"'context' instead (a zenalign.plugins.RunContext: step, seed, rank, world_size, "
                              f"gather_objects, reset_reference_to_policy)")
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise PluginError(f"plugin '{label}' is not a valid zenalign plugin: {one_line(exc)}") from exc


def _parameters(function: object) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return ()


def trace_hook_calls(pm: pluggy.PluginManager, write=None) -> Callable[[], None]:
    """Print each hook call with its arguments, then its result (or exception), through pluggy's
    hook-call monitoring. ``write`` defaults to stderr. Returns the function that stops it."""
    write = write or (lambda line: print(line, file=sys.stderr, flush=True))

    def short(value: object) -> str:
        text = one_line(repr(value))
        return text if len(text) <= 200 else text[:197] + "..."

    def before(hook_name, hook_impls, kwargs):
        plugins = ", ".join(impl.plugin_name for impl in hook_impls)
        args = ", ".join(f"{k}={short(v)}" for k, v in kwargs.items())
        write(f"zenalign plugin trace: {hook_name}({args}) -> [{plugins}]")

    def after(outcome, hook_name, hook_impls, kwargs):
        if outcome.exception is not None:
            write(f"zenalign plugin trace: {hook_name} raised {type(outcome.exception).__name__}: {short(outcome.exception)}")
        else:
            write(f"zenalign plugin trace: {hook_name} returned {short(outcome.get_result())}")

    return pm.add_hookcall_monitoring(before, after)


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
        register(pm, plugin, name=ep.name)


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
                register(pm, module, name=name)
            except PluginError as exc:
                raise PluginError(f"{label}: {exc}") from exc


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
