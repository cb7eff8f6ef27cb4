"""zenalign: GRPO for language models, with pluggable reward sources and advantage normalizers.

    from zenalign import GRPOTrainer
    GRPOTrainer(model=model, reward_model=reward_model, group_size=12, clip_epsilon=0.15).train(prompts)

Plugins: ``from zenalign import hookimpl`` and see docs/writing-a-plugin.md.
"""

from zenalign.errors import ZenalignError
from zenalign.hookspecs import hookimpl
from zenalign.plugin_types import (
    AdvantageNormalizer,
    BuildContext,
    NormalizerType,
    Objectives,
    Options,
    RewardSource,
    RewardSourceType,
    ScoreBatch,
    Task,
    TaskType,
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
    "ScoreBatch",
    "Task",
    "TaskType",
]


def __getattr__(name):
    # The trainer pulls in transformers; import it only when asked for.
    if name == "GRPOTrainer":
        from zenalign.trainer import GRPOTrainer

        return GRPOTrainer
    if name == "load_recipe":
        from zenalign.recipe_loader import load_recipe

        return load_recipe
    raise AttributeError(f"module 'zenalign' has no attribute {name!r}")
