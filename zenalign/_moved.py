"""The flat module names of zenalign 0.1, kept importable for one release.

``import zenalign.advantages`` (as docs/writing-a-plugin.md used to show) returns the module now
at ``zenalign.grpo.advantages``, with a FutureWarning naming the new import. A module whose
contents were split between several new ones is served by a stand-in that looks each name up in
them; a name that was renamed says what it is called now.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED: dict[str, tuple[str, ...]] = {
    "zenalign.hookspecs": ("zenalign.plugins.hookspecs",),
    "zenalign.plugin_types": ("zenalign.plugins.api",),
    "zenalign.recipe_loader": ("zenalign.recipe.loader", "zenalign.recipe.messages"),
    "zenalign.reference": ("zenalign.recipe.docs",),
    "zenalign.principles": ("zenalign.recipe.principles",),
    "zenalign.fastpath": ("zenalign.models.lean", "zenalign.models.lean.model", "zenalign.models.lean.kernels"),
    "zenalign.attention": ("zenalign.models.attention",),
    "zenalign.reward_model": ("zenalign.models.reward_model",),
    "zenalign.gumbel": ("zenalign.generation.gumbel",),
    "zenalign.sampling": ("zenalign.generation.rollout", "zenalign.generation.decode", "zenalign.models.primitives"),
    "zenalign.scoring": ("zenalign.grpo.scoring",),
    "zenalign.advantages": ("zenalign.grpo.advantages", "zenalign.plugins.advantages"),
    "zenalign.loss": ("zenalign.plugins.losses", "zenalign.models.logprobs", "zenalign.models.primitives"),
    "zenalign.metrics": ("zenalign.grpo.metrics",),
    "zenalign.trainer": ("zenalign.train.trainer", "zenalign.train.update"),
    "zenalign.components": ("zenalign.train.build", "zenalign.recipe.loader"),
    "zenalign.checkpoint": ("zenalign.train.checkpoint",),
    "zenalign.engine": ("zenalign.train.engine",),
    "zenalign.distributed": ("zenalign.train.distributed",),
    "zenalign.memory": ("zenalign.train.memory",),
    "zenalign.rundir": ("zenalign.train.rundir",),
    "zenalign.cli": ("zenalign.commands.cli",),
    "zenalign.sweep": ("zenalign.commands.sweep",),
    "zenalign.export": ("zenalign.commands.export",),
    "zenalign.rm_train": ("zenalign.commands.train_rm",),
    "zenalign.critique": ("zenalign.commands.critique_revise",),
    "zenalign.plotting": ("zenalign.commands.plot",),
    "zenalign.pareto": ("zenalign.commands.pareto",),
    # zenalign 0.2: the formulas plugins build on moved down to zenalign.plugins, where plugins import them
    "zenalign.grpo.loss": ("zenalign.plugins.losses",),
    "zenalign.grpo.gae": ("zenalign.plugins.ppo",),
    # zenalign 0.2: every way a completion is produced lives in zenalign.generation; log-probs are model code
    "zenalign.grpo.rollout": ("zenalign.generation.rollout",),
    "zenalign.grpo.gumbel": ("zenalign.generation.gumbel",),
    "zenalign.grpo.vllm_engine": ("zenalign.generation.vllm_engine",),
    "zenalign.train.generation": ("zenalign.generation.generator",),
    "zenalign.grpo.logprobs": ("zenalign.models.logprobs",),
}
RENAMED = {
    "grpo_token_loss": "zenalign.plugins.GRPOLoss(...).per_token",
    "lean_decode": "zenalign.generation.rollout.decode_groups",
    "masked_mean": "nothing (it was unused)",
}


class _SplitModule(types.ModuleType):
    """Stands in for an old module whose names now live in several modules."""

    def __init__(self, name: str, sources: tuple[str, ...]):
        super().__init__(name)
        self._sources = sources

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for source in self._sources:
            module = importlib.import_module(source)
            if hasattr(module, attr):
                return getattr(module, attr)
        new = RENAMED.get(attr, f"not in {', '.join(self._sources)}")
        raise AttributeError(f"{self.__name__}.{attr} moved: now {new}")


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {' and '.join(new)}; import from there (the old name goes in the next "
                      f"release)", FutureWarning, stacklevel=4)
        return importlib.import_module(new[0]) if len(new) == 1 else _SplitModule(spec.name, new)

    def exec_module(self, module):
        pass  # the new modules are already executed


def install_moved_module_aliases() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
