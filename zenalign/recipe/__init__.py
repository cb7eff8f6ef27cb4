"""The recipe: its pydantic schema (the only defaults), loading YAML with dotted overrides,
one-line validation messages, and the generated recipe reference."""

from zenalign.recipe.loader import LoadedRecipe, load_recipe, recipe_from_options, validate_recipe
from zenalign.recipe.schema import Recipe, build_recipe_model

__all__ = ["LoadedRecipe", "Recipe", "build_recipe_model", "load_recipe", "recipe_from_options", "validate_recipe"]
