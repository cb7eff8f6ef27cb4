"""The flat module names of zenalign 0.1, kept importable for one release.

``import zenalign.advantages`` (as docs/writing-a-plugin.md used to show) returns the module now
at ``zenalign.grpo.advantages``, with a FutureWarning naming the new import. Modules whose names
were split across several new ones alias the module that holds what plugins imported from them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "zenalign.hookspecs": "zenalign.plugins.hookspecs",
    "zenalign.plugin_types": "zenalign.plugins.api",
    "zenalign.recipe_loader": "zenalign.recipe.loader",
    "zenalign.reference": "zenalign.recipe.docs",
    "zenalign.principles": "zenalign.recipe.principles",
    "zenalign.fastpath": "zenalign.models.lean",
    "zenalign.attention": "zenalign.models.attention",
    "zenalign.reward_model": "zenalign.models.reward_model",
    "zenalign.gumbel": "zenalign.grpo.gumbel",
    "zenalign.sampling": "zenalign.grpo.rollout",
    "zenalign.scoring": "zenalign.grpo.scoring",
    "zenalign.advantages": "zenalign.grpo.advantages",
    "zenalign.loss": "zenalign.grpo.loss",
    "zenalign.metrics": "zenalign.grpo.metrics",
    "zenalign.trainer": "zenalign.train.trainer",
    "zenalign.components": "zenalign.train.build",
    "zenalign.checkpoint": "zenalign.train.checkpoint",
    "zenalign.engine": "zenalign.train.engine",
    "zenalign.distributed": "zenalign.train.distributed",
    "zenalign.memory": "zenalign.train.memory",
    "zenalign.rundir": "zenalign.train.rundir",
    "zenalign.cli": "zenalign.commands.cli",
    "zenalign.sweep": "zenalign.commands.sweep",
    "zenalign.export": "zenalign.commands.export",
    "zenalign.rm_train": "zenalign.commands.train_rm",
    "zenalign.critique": "zenalign.commands.critique_revise",
    "zenalign.plotting": "zenalign.commands.plot",
    "zenalign.pareto": "zenalign.commands.pareto",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import from {new} (the old name goes in the next release)",
                      FutureWarning, stacklevel=4)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the new module is already executed


def install_moved_module_aliases() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
