"""The recipe: its pydantic schema (the only defaults), loading YAML with dotted overrides,
one-line validation messages, and the generated recipe reference."""

from zenalign.recipe.loader import LoadedRecipe, load_recipe, recipe_from_options, validate_recipe
from zenalign.recipe.schema import (
    ENTRY_BASES,
    EngineSection,
    GRPOSection,
    LoraSection,
    FilterEntry,
    LossEntry,
    ModelSection,
    NormalizerEntry,
    ObjectiveSpec,
    Recipe,
    RewardEntry,
    RunSection,
    SamplingSection,
    Section,
    SweepSection,
    TaskEntry,
    build_recipe_model,
    entry_model,
    tagged_union,
)

__all__ = [
    "ENTRY_BASES", "EngineSection", "GRPOSection", "FilterEntry", "LoadedRecipe", "LoraSection", "LossEntry", "ModelSection",
    "NormalizerEntry", "ObjectiveSpec", "Recipe", "RewardEntry", "RunSection", "SamplingSection", "Section",
    "SweepSection", "TaskEntry", "build_recipe_model", "entry_model", "load_recipe", "recipe_from_options",
    "tagged_union", "validate_recipe",
]
