"""Principles (a constitution): inline in a recipe or in a file, each with a name and a text."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union


from pydantic import BaseModel, Field

from zenalign.data import read_utf8
from zenalign.errors import RecipeError
from zenalign.recipe.loader import load_yaml_text


class Principle(BaseModel):
    name: str = Field(description="Objective name.")
    text: str = Field(description="The principle, as the judge (or the critic) reads it.")


def load_principles(items: Sequence[Union[str, Principle, dict]], file: Optional[str], base_dir: Path,
                    where: str = "principles") -> list[Principle]:
    """Strings become ``principle_1``, ``principle_2``, ...; a file holds a YAML list (same forms)
    or one principle per line. An empty list or repeated names are errors."""
    items = list(items)
    if file:
        path = Path(file) if Path(file).is_absolute() else base_dir / file
        if not path.is_file():
            raise RecipeError(f"{where}_file: '{path}' does not exist")
        text = read_utf8(path, RecipeError)
        loaded: Any = load_yaml_text(text) if path.suffix in (".yaml", ".yml", ".json") else [
            line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(loaded, list):
            raise RecipeError(f"{where}_file: '{path}' must hold a list of principles")
        items += loaded
    principles = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            principles.append(Principle(name=f"principle_{i + 1}", text=item))
        else:
            principles.append(item if isinstance(item, Principle) else Principle.model_validate(item))
    if not principles:
        raise RecipeError(f"{where}: the list is empty; give at least one principle (inline or in {where}_file)")
    names = [p.name for p in principles]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: names must be unique (got {', '.join(names)})")
    return principles
