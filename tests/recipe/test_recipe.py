"""The recipe schema: defaults, descriptions, overrides, plugin options, shipped recipes, docs."""

import json
from pathlib import Path

import pytest
import yaml

from helpers import REPO, RECIPES
from zenalign.errors import RecipeError
from zenalign.plugins import collect_registry
from zenalign.plugins import new_plugin_manager
from zenalign.recipe.schema import ENTRY_BASES, Recipe, build_recipe_model
from zenalign.recipe.loader import load_recipe, validate_recipe
from zenalign.recipe.docs import recipe_reference

SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_defaults_follow_the_paper():
    r = Recipe()
    assert r.grpo.kl_coef == 0.01  # lower than PPO's usual 0.1
    loss = validate_recipe({}, "r.yaml", Path("."), "r").recipe.loss  # the default loss and its options
    assert loss.type == "grpo" and loss.kl_estimator == "k3"
    assert loss.clip_epsilon == 0.2 and loss.clip_epsilon_high is None and loss.upper_clip_epsilon == 0.2
    assert r.sampling.group_size == 8
    assert loss.aggregation == "grpo" and r.grpo.num_iterations == 1
    assert r.model.trust_remote_code is False


def section_models():
    from zenalign.recipe.docs import _model_of

    models = [m for m in (_model_of(f.annotation) for f in Recipe.model_fields.values()) if m is not None]
    assert {m.__name__ for m in models} >= {"ObjectiveSpec", "SweepSection", "GRPOSection", "EngineSection"}
    models += list(ENTRY_BASES.values())
    registry = collect_registry()
    for kind in ("reward", "normalizer", "task"):
        models += [registry.types[kind][n].options for n in registry.names(kind)]
    return models


def test_every_field_has_a_description():
    missing = [
        f"{model.__name__}.{name}"
        for model in [Recipe, *section_models()]
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert missing == []


def test_sections_are_exactly_the_documented_ones():
    assert list(Recipe.model_fields) == ["model", "data", "sampling", "grpo", "rewards", "objectives", "filters", "normalizer", "loss", "environment", "engine", "run", "plugins", "sweep"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_validates(path):
    loaded = load_recipe(path)
    assert loaded.recipe.rewards and loaded.recipe.data is not None
    assert (loaded.base_dir / loaded.recipe.model.path / "config.json").is_file()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_header_gives_its_command(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"zenalign run recipes/{path.name}" in line for line in header)


def test_the_old_decoder_name_lean_still_works_with_a_future_warning():
    with pytest.warns(FutureWarning, match="sampling.decoder: 'lean' is now called 'zenalign'"):
        loaded = validate({"sampling": {"decoder": "lean"}})
    assert loaded.recipe.sampling.decoder == "zenalign"
    assert validate({"sampling": {"decoder": "generate"}}).recipe.sampling.decoder == "generate"


def test_overrides_are_typed_and_nested():
    loaded = load_recipe(RECIPES / "quickstart.yaml", [
        "grpo.kl_coef=0.0", "sampling.group_size=16", "rewards.0.weight=2", "engine.max_grad_norm=null",
        "run.output_dir=elsewhere", "grpo.adam_betas=[0.8, 0.9]", "run.seed=7",
    ])
    r = loaded.recipe
    assert r.grpo.kl_coef == 0.0 and r.sampling.group_size == 16 and r.rewards[0].weight == 2.0
    assert r.engine.max_grad_norm is None and r.run.output_dir == "elsewhere" and r.run.seed == 7
    assert r.grpo.adam_betas == (0.8, 0.9)


def test_section_overrides_merge_with_the_recipe_and_with_dotted_ones():
    """Issue 19: `run.steps=3 "run={overwrite: true}"` reset the recipe's whole run section."""
    QUICKSTART = RECIPES / "quickstart.yaml"
    loaded = load_recipe(QUICKSTART, ["run.steps=3", "run={overwrite: true}"])
    run = loaded.recipe.run
    assert (run.steps, run.overwrite, run.eval_interval, run.log_interval) == (3, True, 20, 10)  # 20, 10: the recipe's
    loaded = load_recipe(QUICKSTART, ["normalizer={type: rank}"])  # another plugin type replaces the section
    assert loaded.recipe.normalizer.type == "rank"
    with pytest.raises(RecipeError, match=r"override 'run.steps=3' and override 'run=\{steps: 7\}' both set run.steps \(3 vs 7\)"):
        load_recipe(QUICKSTART, ["run.steps=3", "run={steps: 7}"])
    assert load_recipe(QUICKSTART, ["run.steps=3", "run.steps=5"]).recipe.run.steps == 5  # the same key again: last wins


def test_override_is_validated_and_blamed():
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "quickstart.yaml", ["sampling.group_size=1"])
    assert "override 'sampling.group_size=1'" in str(err.value) and "must be >= 2" in str(err.value)
    with pytest.raises(RecipeError, match="unknown field; accepted here: .*clip_epsilon"):
        load_recipe(RECIPES / "quickstart.yaml", ["loss.clip_epsilonn=0.3"])
    with pytest.raises(RecipeError, match="index 3 is out of range"):
        load_recipe(RECIPES / "quickstart.yaml", ["rewards.3.weight=1"])


def validate(data):
    return validate_recipe(data, source="r.yaml", base_dir=Path.cwd(), name="r")


def test_plugin_options_are_validated_against_the_plugin():
    with pytest.raises(RecipeError) as err:
        validate({"rewards": [{"type": "regex_match"}]})
    assert str(err.value) == "r.yaml: rewards[0].pattern: required field is missing"
    with pytest.raises(RecipeError) as err:
        validate({"rewards": [{"type": "regex_match", "pattern": "(unclosed"}]})
    assert "rewards[0].pattern" in str(err.value) and "not a valid regular expression" in str(err.value)
    with pytest.raises(RecipeError) as err:
        validate({"normalizer": {"type": "batch_zscore", "center": "middle"}})
    assert "normalizer.center: must be one of 'batch' or 'group'" in str(err.value)
    with pytest.raises(RecipeError) as err:
        validate({"rewards": [{"type": "length", "unit": "tokens", "target": 5, "prefered": "shorter"}]})
    assert "rewards[0].prefered: unknown field; accepted here: type, unit, prefer, target, scale, name, weight" in str(err.value)


def test_unknown_plugin_type_lists_installed_ones():
    with pytest.raises(RecipeError) as err:
        validate({"normalizer": {"type": "zscore"}})
    message = str(err.value)
    assert "normalizer: unknown type 'zscore'" in message
    for name in collect_registry().names("normalizer"):
        assert name in message


def test_default_normalizer_comes_from_the_plugin_marked_default():
    loaded = validate({})
    registry = collect_registry()
    assert loaded.recipe.normalizer.type == registry.default("normalizer") == "group_zscore"
    assert loaded.recipe.normalizer.eps == 1e-6  # the plugin's own defaults are filled in


def test_resolved_recipe_round_trips():
    loaded = load_recipe(RECIPES / "quickstart.yaml", ["grpo.kl_coef=0.05"])
    dumped = yaml.safe_load(yaml.safe_dump(loaded.recipe.model_dump(mode="json")))
    again = validate(dumped)
    assert again.recipe.model_dump() == loaded.recipe.model_dump()


def test_json_schema_includes_plugin_options():
    schema = build_recipe_model(collect_registry()).model_json_schema()
    text = json.dumps(schema)
    assert '"regex_match"' in text and '"pattern"' in text and '"clip_epsilon"' in text
    assert schema["additionalProperties"] is False


def test_recipe_reference_doc_is_current():
    doc = (REPO / "docs" / "recipe-reference.md").read_text(encoding="utf-8")
    installed = collect_registry(new_plugin_manager())  # without plugins loaded by other tests' recipes
    assert doc == recipe_reference(installed), "regenerate: zenalign schema --format markdown > docs/recipe-reference.md"


@pytest.mark.parametrize("path", sorted((RECIPES / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_follow_the_schema(path):
    if path.name == "constitution.yaml":  # a principles file, not a recipe
        from zenalign.recipe.principles import load_principles

        assert len(load_principles([], path.name, path.parent)) == 3
        return
    load_recipe(path)  # schema only: the models they name are downloaded by the user


@pytest.mark.parametrize("path", sorted((RECIPES / "train-rm").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_reward_model_recipes_validate(path):
    from zenalign.commands.train_rm import load_rm_recipe

    recipe = load_rm_recipe(path)
    assert (path.parent / recipe.data.path).is_file() and (path.parent / recipe.model.path / "config.json").is_file()
    assert f"zenalign train-rm recipes/train-rm/{path.name}" in path.read_text()


def test_shipped_critique_revise_recipe_validates():
    from zenalign.commands.critique_revise import load_critique_recipe

    path = RECIPES / "critique-revise" / "hhh.yaml"
    recipe, _ = load_critique_recipe(path)
    assert recipe.data.type == "hhh" and "zenalign critique-revise recipes/critique-revise/hhh.yaml" in path.read_text()


def test_yaml_booleans_are_yaml_1_2(tmp_path):
    """Only true/false are booleans: the constitution's `yes:`/`no:` keys and y/n answers stay strings."""
    from zenalign.recipe.loader import load_yaml_text, parse_override

    assert load_yaml_text("yes: y\nno: n\non: off\na: true\nb: False") == {"yes": "y", "no": "n", "on": "off", "a": True, "b": False}
    assert parse_override("run.overwrite=true") == (["run", "overwrite"], True)
    assert parse_override("rewards.0.yes=yes") == (["rewards", "0", "yes"], "yes")


@pytest.mark.parametrize("override, message", [
    # NaN and infinity in any number, plugin options included (pydantic accepts both by default)
    ("sampling.temperature=.inf", "sampling.temperature: expected a finite number (got inf)"),
    ("grpo.kl_coef=.inf", "grpo.kl_coef: expected a finite number (got inf)"),
    ("grpo.learning_rate=.inf", "grpo.learning_rate: expected a finite number (got inf)"),
    ("loss.clip_epsilon_high=.nan", "loss.clip_epsilon_high: expected a finite number (got nan)"),
    ("grpo.clip_epsilon_high=.nan", "loss.clip_epsilon_high: expected a finite number (got nan)"),  # the older name
    ("grpo.weight_decay=.inf", "grpo.weight_decay: expected a finite number (got inf)"),
    ("engine.max_grad_norm=.inf", "engine.max_grad_norm: expected a finite number (got inf)"),
    ("rewards.0.correct_score=.nan", "rewards[0].correct_score: expected a finite number (got nan)"),
    ("normalizer.eps=.inf", "normalizer.eps: expected a finite number (got inf)"),
    # true/false for a number (pydantic reads them as 1 and 0)
    ("run.eval_interval=true", "run.eval_interval: expected a number (got True)"),
    ("sampling.max_new_tokens=true", "sampling.max_new_tokens: expected a number (got True)"),
    ("rewards.0.wrong_score=false", "rewards[0].wrong_score: expected a number (got False)"),
    # bounds
    ("sampling.temperature=1.0e-300", "sampling.temperature: must be >= 1e-06 (got 1e-300)"),
    ("run.seed=4294967296", "run.seed: must be <= 4294967295 (got 4294967296)"),
    ("grpo.adam_betas=[0.9, 1.0]", "grpo.adam_betas: each beta must be in [0, 1)"),
    ("engine.num_threads=1000000000", "engine.num_threads: must be <= 1024 (got 1000000000)"),
    ("engine.collective_timeout_s=1e12", "engine.collective_timeout_s: must be <= 2592000.0"),
    ("engine.deepspeed_config={train_batch_size: 8}", "engine.deepspeed_config: is read only by engine.backend: deepspeed"),
    ("model.reference_path=''", "model.reference_path: empty; give a directory, or leave the field out"),
    ("rewards.0.name=' '", "rewards[0].name: empty; give the objective a name"),
    ("data.train_size=1000000000", "data.train_size: must be <= 1000000 (got 1000000000)"),  # hung drawing words
    ("data.max_length=1000000000", "data.max_length: must be <= 100 (got 1000000000)"),
])
def test_out_of_bounds_values_are_refused_with_one_line(override, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(RECIPES / "quickstart.yaml", [override])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_values_within_the_new_bounds_are_accepted():
    r = load_recipe(RECIPES / "quickstart.yaml", ["sampling.temperature=1.0e-6", "run.seed=4294967295", "grpo.kl_coef=100",
                                                  "engine.backend=deepspeed", "engine.deepspeed_config={x: 1}"]).recipe
    assert (r.sampling.temperature, r.run.seed, r.grpo.kl_coef, r.engine.deepspeed_config) == (1e-6, 2**32 - 1, 100, {"x": 1})


def test_a_long_value_is_cut_short_in_the_error_line():
    with pytest.raises(RecipeError) as caught:
        load_recipe(RECIPES / "quickstart.yaml", ["grpo.kl_coef=" + "x" * 5000])
    assert str(caught.value) == (f"override 'grpo.kl_coef={'x' * 47}... (5,013 characters)': grpo.kl_coef: expected a "
                                 f"number (got '{'x' * 60}'... (5,000 characters))")


def test_a_path_the_file_system_cannot_look_up_is_one_line(tmp_path):
    """A name too long for the file system was an OSError traceback at validate."""
    from zenalign.errors import ModelLoadError
    from zenalign.models.loading import check_model_dir

    with pytest.raises(ModelLoadError, match=r"^model\.path: '.*\.\.\. \(5,\d{3} characters\)' is not a usable path "
                                             r"\(OSError: File name too long\); give a local Hugging Face model directory$"):
        check_model_dir(tmp_path / ("x" * 5000), "model.path")
    with pytest.raises(RecipeError, match=r"run\.output_dir: not a usable path \(OSError: File name too long\)"):
        load_recipe(RECIPES / "quickstart.yaml", ["run.output_dir=" + "x" * 5000])


def test_the_reverse_task_refuses_more_words_than_its_letters_make():
    """It drew words until 50 x train_size + 1,000 attempts had failed (a million for the quickstart)."""
    from zenalign.errors import PluginError

    with pytest.raises(PluginError, match=r"data \(reverse\): could not be built: ValueError: train_size \+ eval_size = "
                                          r"20,200 words, but 2 letters make only 120 distinct words of 3-6 letters"):
        from zenalign.train.trainer import GRPOTrainer

        GRPOTrainer.from_recipe(load_recipe(RECIPES / "quickstart.yaml", ["data.alphabet=ab"])).check()
