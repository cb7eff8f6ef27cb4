"""zenalign.recipe.trl on its own: how a mapping with TRL's names splits into zenalign's fields
and the settings those names make (the loader applies them; tests/recipe/test_trl_compat.py covers the
whole path through recipes, overrides and the API)."""

from __future__ import annotations

import pytest

from zenalign.errors import RecipeError
from zenalign.recipe.trl import Setting, is_trl_name, split_recipe, trl_settings


def test_a_recipe_splits_into_its_own_fields_and_what_trls_names_set():
    requirements = []
    own, settings = split_recipe({"beta": 0.04, "grpo": {"num_generations": 8, "learning_rate": 1e-5},
                                  "run": {"seed": 3}, "bf16": True}, "r.yaml", requirements)
    assert own == {"grpo": {"learning_rate": 1e-5}, "run": {"seed": 3}}  # run.seed is zenalign's own name there
    assert {s.path: s.value for s in settings} == {("grpo", "kl_coef"): 0.04, ("sampling", "group_size"): 8,
                                                   ("engine", "precision"): "bf16"}
    by_key = {s.key: s for s in settings}
    assert by_key[("grpo", "num_generations")].origin == "grpo.num_generations (TRL's name for sampling.group_size)"
    assert requirements == []


def test_a_name_is_trls_only_where_zenalign_has_no_field_of_that_name():
    assert is_trl_name(None, "seed") and not is_trl_name("run", "seed")
    assert is_trl_name("grpo", "beta") and not is_trl_name("grpo", "kl_coef")
    assert not is_trl_name(None, "grpo")  # a section


def test_a_value_with_no_equivalent_is_refused_naming_it_and_a_conditional_one_waits_for_its_requirement():
    with pytest.raises(RecipeError, match=r"^GRPOTrainer: push_to_hub=True \(TRL\) has no zenalign equivalent: "):
        trl_settings("push_to_hub", True, "push_to_hub", "GRPOTrainer", [])
    assert trl_settings("push_to_hub", False, "push_to_hub", "GRPOTrainer", []) == []  # asks for nothing
    requirements = []
    assert trl_settings("num_train_epochs", 3, "num_train_epochs", "r.yaml", requirements) == []
    assert [r.path for r in requirements] == [("run", "steps")]  # accepted only beside max_steps
    with pytest.raises(RecipeError, match=r"max_steps=0 \(TRL\) leaves the length to num_train_epochs"):
        trl_settings("max_steps", 0, "max_steps", "r.yaml", [])
    assert trl_settings("max_steps", 20, "max_steps", "r.yaml", []) == [
        Setting(("run", "steps"), 20, "max_steps (TRL's name for run.steps)", ("max_steps",))]
