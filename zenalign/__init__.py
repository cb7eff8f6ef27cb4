"""zenalign: GRPO for language models, with pluggable reward sources and advantage normalizers.

    from zenalign import GRPOTrainer
    GRPOTrainer(model=model, reward_model=reward_model, group_size=12, clip_epsilon=0.15).train(prompts)

Plugins: ``from zenalign.plugins import hookimpl`` (also re-exported here) and see
docs/writing-a-plugin.md. The package is split by concept, imports flowing one way:
errors/data < plugins < recipe < models < generation < grpo < train < commands
(tests/test_layout.py).
"""

from zenalign._moved import install_moved_module_aliases
from zenalign.errors import ZenalignError
from zenalign.plugins import (
    AdvantageNormalizer,
    BuildContext,
    NormalizerType,
    Objectives,
    Options,
    RewardSource,
    RewardSourceType,
    RunContext,
    ScoreBatch,
    Task,
    TaskType,
    hookimpl,
)

__version__ = "0.1.0"

__all__ = [
    "GRPOTrainer",
    "load_recipe",
    "hookimpl",
    "ZenalignError",
    "AdvantageNormalizer",
    "BuildContext",
    "NormalizerType",
    "Objectives",
    "Options",
    "RewardSource",
    "RewardSourceType",
    "RunContext",
    "ScoreBatch",
    "Task",
    "TaskType",
]

install_moved_module_aliases()


def __getattr__(name):
    # The trainer pulls in transformers; import it only when asked for.
    if name == "GRPOTrainer":
        from zenalign.train.trainer import GRPOTrainer

        return GRPOTrainer
    if name == "load_recipe":
        from zenalign.recipe.loader import load_recipe

        return load_recipe
    raise AttributeError(f"module 'zenalign' has no attribute {name!r}")
